//! A small pool of I/O threads shared by the queues of one connection.
//!
//! Requests are executed synchronously. From the page cache that is the fastest way (a
//! request costs a few microseconds and any hand-off would cost more), but a request that
//! waits (a copy-out that waits for the journal to be durable, a device read) would make the
//! whole queue wait behind it. The queue worker therefore hands the requests of a batch to this
//! pool when its requests have recently been slow, and runs them itself otherwise; it also
//! executes queued jobs while it waits, so a batch always makes progress.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    work: Condvar,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Threads are started on first use, so a connection that never needs them has none.
pub(crate) struct IoPool {
    name: String,
    size: usize,
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    pub(crate) fn new(name: &str, size: usize) -> IoPool {
        IoPool {
            name: name.to_owned(),
            size,
            inner: Arc::default(),
            threads: Mutex::new(Vec::new()),
        }
    }

    fn ensure_started(&self) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if !threads.is_empty() || self.size == 0 {
            return;
        }
        for i in 0..self.size {
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("io-{}-{i}", self.name))
                .spawn(move || loop {
                    let job = {
                        let mut st = inner.lock();
                        loop {
                            if let Some(j) = st.jobs.pop_front() {
                                break Some(j);
                            }
                            if st.stop {
                                break None;
                            }
                            st = inner.work.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                    };
                    match job {
                        Some(j) => j(),
                        None => return,
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // The queue workers run the jobs themselves; fewer threads only cost speed.
                    log::warn!(
                        "export {}: started {i} of {} I/O threads: {e}",
                        self.name,
                        self.size
                    );
                    break;
                }
            }
        }
    }

    /// Queues jobs for the pool threads.
    pub(crate) fn submit(&self, jobs: Vec<Job>) {
        self.ensure_started();
        let n = jobs.len();
        self.inner.lock().jobs.extend(jobs);
        if n == 1 {
            self.inner.work.notify_one();
        } else {
            self.inner.work.notify_all();
        }
    }

    /// Takes one queued job, for a caller that would otherwise wait.
    pub(crate) fn try_take(&self) -> Option<Job> {
        self.inner.lock().jobs.pop_front()
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.work.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Counts the outstanding jobs of one batch and collects their results.
pub(crate) struct Batch<T> {
    state: Mutex<(usize, Vec<Option<T>>)>,
    done: Condvar,
}

impl<T> Batch<T> {
    pub(crate) fn new(n: usize) -> Arc<Batch<T>> {
        Arc::new(Batch {
            state: Mutex::new((n, (0..n).map(|_| None).collect())),
            done: Condvar::new(),
        })
    }

    /// Records the result of job `i`.
    pub(crate) fn finish(&self, i: usize, value: T) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = st.1.get_mut(i) {
            *slot = Some(value);
        }
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            self.done.notify_all();
        }
    }

    /// Runs queued jobs of `pool` while this batch is not complete, then returns the results
    /// in job order.
    pub(crate) fn wait(&self, pool: &IoPool) -> Vec<Option<T>> {
        loop {
            {
                let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.0 == 0 {
                    break;
                }
            }
            match pool.try_take() {
                Some(job) => job(),
                None => {
                    let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    while st.0 > 0 {
                        st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    break;
                }
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut st.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_results_come_back_in_job_order() {
        let pool = IoPool::new("t", 3);
        let batch = Batch::new(50);
        let jobs: Vec<Job> = (0..50)
            .map(|i| {
                let b = batch.clone();
                Box::new(move || b.finish(i, i * 10)) as Job
            })
            .collect();
        pool.submit(jobs);
        let r = batch.wait(&pool);
        assert_eq!(r, (0..50).map(|i| Some(i * 10)).collect::<Vec<_>>());
    }

    #[test]
    fn a_pool_without_threads_is_drained_by_the_waiter() {
        let pool = IoPool::new("t", 0);
        let batch = Batch::new(4);
        let jobs: Vec<Job> = (0..4)
            .map(|i| {
                let b = batch.clone();
                Box::new(move || b.finish(i, i)) as Job
            })
            .collect();
        pool.submit(jobs);
        assert_eq!(batch.wait(&pool), vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn jobs_run_concurrently() {
        // Three jobs that each wait for the others: they can only finish if they run at once.
        let pool = IoPool::new("t", 3);
        let barrier = Arc::new(std::sync::Barrier::new(3));
        let batch = Batch::new(3);
        let jobs: Vec<Job> = (0..3)
            .map(|i| {
                let b = batch.clone();
                let bar = barrier.clone();
                Box::new(move || {
                    bar.wait();
                    b.finish(i, ());
                }) as Job
            })
            .collect();
        pool.submit(jobs);
        assert_eq!(batch.wait(&pool).len(), 3);
    }
}
