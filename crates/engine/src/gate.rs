//! A drain barrier between I/O and metadata operations.
//!
//! Writes to a volume pass through its gate (two atomic operations, no lock). A snapshot
//! creation, delete or rollback closes the gate: new writes wait, writes already inside finish,
//! then the operation runs with the volume quiet and reopens the gate. This is what makes a
//! snapshot point-in-time: a write is either wholly before the cut or wholly after it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};

/// See the module documentation.
#[derive(Debug, Default)]
pub struct IoGate {
    inside: AtomicU64,
    closed: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
    closer: Mutex<()>,
}

/// Held while an I/O is inside the gate.
pub struct Pass<'a>(&'a IoGate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Held while the gate is closed; reopens it when dropped.
pub struct Closed<'a> {
    gate: &'a IoGate,
    _closer: MutexGuard<'a, ()>,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let _l = self.gate.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gate.closed.store(false, SeqCst);
        self.gate.changed.notify_all();
    }
}

impl IoGate {
    /// Enters the gate, waiting while it is closed.
    pub fn enter(&self) -> Pass<'_> {
        loop {
            self.inside.fetch_add(1, SeqCst);
            if !self.closed.load(SeqCst) {
                return Pass(self);
            }
            self.leave();
            let mut l = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            while self.closed.load(SeqCst) {
                l = self.changed.wait(l).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn leave(&self) {
        if self.inside.fetch_sub(1, SeqCst) == 1 && self.closed.load(SeqCst) {
            let _l = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.changed.notify_all();
        }
    }

    /// Closes the gate and waits until no I/O is inside.
    pub fn close(&self) -> Closed<'_> {
        let closer = self.closer.lock().unwrap_or_else(|e| e.into_inner());
        let mut l = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, SeqCst);
        while self.inside.load(SeqCst) != 0 {
            l = self.changed.wait(l).unwrap_or_else(|e| e.into_inner());
        }
        drop(l);
        Closed {
            gate: self,
            _closer: closer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn close_waits_for_passes_and_blocks_new_ones() {
        let g = Arc::new(IoGate::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..4 {
            let (g, f, s) = (g.clone(), in_flight.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !s.load(SeqCst) {
                    let _p = g.enter();
                    f.fetch_add(1, SeqCst);
                    std::thread::yield_now();
                    f.fetch_sub(1, SeqCst);
                }
            }));
        }
        for _ in 0..200 {
            let c = g.close();
            assert_eq!(in_flight.load(SeqCst), 0, "an I/O was inside a closed gate");
            std::thread::yield_now();
            assert_eq!(in_flight.load(SeqCst), 0, "an I/O entered a closed gate");
            drop(c);
        }
        stop.store(true, SeqCst);
        for t in threads {
            t.join().unwrap();
        }
    }
}
