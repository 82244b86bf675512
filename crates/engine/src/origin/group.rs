//! Consistency groups: snapshots of several volumes (of different origins, in one store or
//! several) cut at one instant.
//!
//! Every member's gate is closed before any member is cut, so no write to any member lies
//! after the cut on one and before it on another: a write the caller saw completed before it
//! issued another (to any member) is in every snapshot that holds the later one. Locks are
//! taken in one global order (every `ops` by (store, origin id), then every gate in the same
//! order), so two groups, or a group and a single-volume operation, cannot deadlock.

use super::snapshot::check_memo;
use super::*;

/// A volume of a group: the origin (`of: None`) or its snapshot `of`.
pub(crate) struct Member {
    pub core: Arc<OriginCore>,
    pub of: Option<u32>,
}

/// Why a group snapshot failed, and which member (by index in the caller's list) caused it;
/// `None`: the group as a whole (an empty group, a bad memo).
#[derive(Debug, thiserror::Error)]
#[error("{}{error}{}", member.map(|i| format!("member {i}: ")).unwrap_or_default(), left_note(left))]
pub struct GroupError {
    /// The member whose check or cut failed.
    pub member: Option<usize>,
    /// The cause.
    #[source]
    pub error: Error,
    /// Snapshots (member, tag) created by this group that could not be deleted again after
    /// the failure (empty unless the cleanup failed too).
    pub left: Vec<(usize, u32)>,
}

fn left_note(left: &[(usize, u32)]) -> String {
    if left.is_empty() {
        return String::new();
    }
    let l: Vec<String> = left
        .iter()
        .map(|(i, t)| format!("snapshot {t} of member {i}"))
        .collect();
    format!(" (and could not delete again: {})", l.join(", "))
}

fn fail(member: usize) -> impl FnOnce(Error) -> GroupError {
    move |error| GroupError {
        member: Some(member),
        error,
        left: Vec::new(),
    }
}

type GroupResult<T> = std::result::Result<T, GroupError>;

/// Takes `ms`' `ops` locks in order, then runs `f`.
fn with_ops<R>(ms: &[&Member], f: &mut dyn FnMut() -> R) -> R {
    match ms.split_first() {
        None => f(),
        Some((m, rest)) => {
            let _ops = lock(&m.core.ops);
            with_ops(rest, f)
        }
    }
}

/// Closes the gates in order (the origin's, or snapshot `of`'s), then runs `f`.
fn with_gates<R>(gs: &[&IoGate], f: &mut dyn FnMut() -> R) -> R {
    match gs.split_first() {
        None => f(),
        Some((g, rest)) => {
            let _closed = g.close();
            with_gates(rest, f)
        }
    }
}

/// Snapshots every member at one instant; returns the new tags in the members' order. The
/// answer comes as for `create_snapshot` (`sync` likewise). On a failure nothing is left:
/// the snapshots already cut are deleted again before the gates reopen.
pub(crate) fn snapshot_group(members: &[Member], memo: &str, sync: bool) -> GroupResult<Vec<u32>> {
    let whole = |error| GroupError {
        member: None,
        error,
        left: Vec::new(),
    };
    if members.is_empty() {
        return Err(whole(Error::InvalidArgument(
            "a group snapshot needs at least one volume".into(),
        )));
    }
    check_memo(memo).map_err(whole)?;
    for (i, a) in members.iter().enumerate() {
        if let Some(j) = members[..i]
            .iter()
            .position(|b| Arc::ptr_eq(&a.core, &b.core))
        {
            // Two volumes of one origin would need its `ops` twice.
            return Err(fail(i)(Error::InvalidArgument(format!(
                "origin {} is already member {j} of the group; a group takes one volume per origin",
                a.core.id
            ))));
        }
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&members[a].core, &members[b].core);
        (&a.store.name, &a.id).cmp(&(&b.store.name, &b.id))
    });
    let sorted: Vec<&Member> = order.iter().map(|&i| &members[i]).collect();
    let birth = now_secs();
    with_ops(&sorted, &mut || {
        // Under every `ops`: the volumes exist and may be cut.
        let mut parents = Vec::with_capacity(order.len());
        for &i in &order {
            let m = &members[i];
            m.core.check_alive().map_err(fail(i))?;
            parents.push(match m.of {
                None => {
                    m.core.check_no_rollback().map_err(fail(i))?;
                    None
                }
                Some(t) => Some(m.core.snap(t).map_err(fail(i))?),
            });
        }
        let gates: Vec<&IoGate> = order
            .iter()
            .zip(&parents)
            .map(|(&i, p)| p.as_ref().map_or(&members[i].core.gate, |s| &s.gate))
            .collect();
        let cut = with_gates(&gates, &mut || {
            cut_all(members, &order, &parents, birth, memo, sync)
        })?;
        let mut tags = vec![0u32; members.len()];
        for (&i, (tag, epoch)) in order.iter().zip(&cut) {
            tags[i] = *tag;
            members[i]
                .core
                .answer(*epoch, sync, Some(members[i].of.is_none()))
                .map_err(fail(i))?;
        }
        Ok(tags)
    })
}

/// The cuts, with every gate closed: (tag, batch) per member in `order`. Members of one store
/// are cut under one hold of its metadata lock, so their records go into the journal together.
fn cut_all(
    members: &[Member],
    order: &[usize],
    parents: &[Option<Arc<SnapRt>>],
    birth: u64,
    memo: &str,
    sync: bool,
) -> GroupResult<Vec<(u32, u64)>> {
    for &i in order {
        if members[i].of.is_none() {
            members[i].core.before_origin_cut().map_err(fail(i))?;
        }
    }
    let mut cut: Vec<(u32, u64)> = Vec::with_capacity(order.len());
    let mut k = 0;
    while k < order.len() {
        let store = members[order[k]].core.store.clone();
        let first = cut.len();
        let mut m = store.lock_meta();
        while k < order.len() && Arc::ptr_eq(&members[order[k]].core.store, &store) {
            let (i, core) = (order[k], &members[order[k]].core);
            let tag = match &parents[k] {
                None => core.cut_origin(&mut m, birth, memo, sync),
                Some(ps) => core.cut_snapshot(&mut m, ps, birth, memo),
            };
            match tag {
                Ok(tag) => cut.push((tag, 0)), // (its batch is set below)
                Err(e) => {
                    drop(m);
                    return Err(undo(members, order, &cut, fail(i)(e)));
                }
            }
            k += 1;
        }
        let epoch = m.epoch;
        for c in &mut cut[first..] {
            c.1 = epoch;
        }
    }
    Ok(cut)
}

/// Deletes the snapshots `cut` (by position in `order`) made before `err` stopped the group.
fn undo(
    members: &[Member],
    order: &[usize],
    cut: &[(u32, u64)],
    mut err: GroupError,
) -> GroupError {
    for (&i, &(tag, _)) in order.iter().zip(cut) {
        let core = &members[i].core;
        match core.delete_locked(tag) {
            Ok(epoch) => {
                // (Fails only if the store failed: then nothing of the group is durable.)
                let _ = core.store.wait_written(epoch);
                core.store.request_commit();
                core.finish_deaths();
                core.store.wake_worker();
            }
            Err(e) => {
                log::error!(
                    "group snapshot: cannot delete snapshot {tag} of origin {} again: {e}",
                    core.id
                );
                err.left.push((i, tag));
            }
        }
    }
    err
}
