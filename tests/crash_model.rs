//! The model the crash tests (`crash_kill`, `power_cut`) check volumes against after a crash.

/// What a block (or sector) holds: zeroes, or the write `seq` of writer `vol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Never written.
    Zero,
    /// Write `seq` of writer `vol`.
    W { vol: u64, seq: u64 },
}

/// What a writable volume may hold after a crash, per block: the contents it was given in
/// order (`hist`), the first index that must survive (`floor`: a completed flush or rollback
/// moves it up), and the last acknowledged one.
#[derive(Debug, Clone)]
pub struct VolModel {
    pub hist: Vec<Vec<Content>>,
    pub floor: Vec<usize>,
    pub last_acked: Vec<usize>,
}

impl VolModel {
    /// A volume whose blocks hold `initial`, all durable.
    pub fn new(initial: &[Content]) -> Self {
        VolModel {
            hist: initial.iter().map(|c| vec![*c]).collect(),
            floor: vec![0; initial.len()],
            last_acked: vec![0; initial.len()],
        }
    }

    /// The content each block has once every issued write completed.
    pub fn latest(&self) -> Vec<Content> {
        self.hist.iter().map(|h| *h.last().unwrap()).collect()
    }

    /// Why block `b` may not hold `c` after a crash, or `None` if it may.
    pub fn violation(&self, b: usize, c: &Content) -> Option<String> {
        let h = &self.hist[b];
        let floor = self.floor[b];
        if h[floor..].contains(c) {
            return None;
        }
        Some(format!(
            "holds {c:?}, {}; must be one of {:?} (floor {floor} of {})",
            if h[..floor].contains(c) {
                "an older content than a completed flush/rollback allows"
            } else {
                "never written there"
            },
            &h[floor..],
            h.len()
        ))
    }
}
