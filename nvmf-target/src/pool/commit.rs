//! Group commit: metadata changes that arrive while the journal is busy share its next write and flush.
//!
//! Every caller queues its records and then waits for the journal. Whoever gets it takes everything queued so
//! far (its own records and those of callers still waiting), checks each caller's records against the metadata as
//! it will be when they are applied (a caller whose records no longer apply, say a second destroy of a volume, is
//! refused and nothing of it is written), writes the rest as one transaction, applies each
//! caller's records in queue order and tells each caller its result. N allocations in flight thus cost one journal
//! flush, not N, and each caller still returns only once its records are durable.
//!
//! A batch is never cut half way: the journal's holder writes and applies batches in a task of its own (spawned
//! with the journal's lock, it runs until the queue is empty), and every caller, the one that spawned it too,
//! only waits for its answer. A caller dropped at any point (a nexus's child timeout, a request's deadline)
//! changes nothing for the others: its records are still committed, or refused, with the rest, and soon: one dropped
//! while its records still wait in the queue starts a task that takes the journal for them (else they would wait
//! for whoever commits next, maybe much later, out of order with what its caller's caller did since). A caller
//! whose answer can never come (the task was dropped, at runtime shutdown) gets an error, and the pool is faulted,
//! as the batch may be on the journal and not applied.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedMutexGuard, oneshot};

use super::PoolError;
use super::journal::Journal;
use super::meta::Record;

/// Most callers' records written in one transaction (keeps a transaction far below the journal's size).
const MAX_BATCH: usize = 64;

/// The metadata a group commit checks records against and applies them to.
pub(super) trait Metadata: Send + Sync + 'static {
    fn group(&self) -> &GroupCommit;
    /// Checks each caller's records of a batch, in order, against the state they will follow (see
    /// [`super::meta::PoolMeta::admit`]).
    fn admit(&self, batch: &[&[Record]]) -> Vec<Result<(), PoolError>>;
    /// The current state encoded, for when the journal is full and a checkpoint is written first.
    fn state(&self) -> Result<Vec<u8>, PoolError>;
    /// Applies a caller's records, once they are durable. Runs in the journal's task, whether or not the caller
    /// still waits.
    fn apply(self: &Arc<Self>, records: &[Record]) -> Result<(), PoolError>;
    /// Why no commit may be written any more, if so (the pool is faulted).
    fn halted(&self) -> Option<PoolError>;
    /// A batch failed with `e`: it may be on the journal, durable or not, and is not applied.
    fn failed(&self, e: &PoolError);
}

struct Waiting {
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), PoolError>>,
}

pub(super) struct GroupCommit {
    journal: Arc<tokio::sync::Mutex<Journal>>,
    queue: Mutex<Vec<Waiting>>,
}

/// Makes `records` durable, then applies them to `meta` (in journal order). A caller whose records `meta` no
/// longer admits gets its error and nothing is written for it. Once `meta` is halted, every caller gets that
/// error and nothing is written. Dropping the returned future does not stop the commit.
pub(super) async fn commit<M: Metadata>(
    meta: &Arc<M>,
    records: Vec<Record>,
) -> Result<(), PoolError> {
    let (tx, mut rx) = oneshot::channel();
    let group = meta.group();
    group.queue().push(Waiting { records, done: tx });
    let mut abandoned = Abandoned(Some(meta.clone()));
    // Whoever gets the journal hands it to a task that drains the queue; every caller waits for the journal
    // until its answer comes, so a queue left behind by a finished task always finds a new holder.
    let lost = || {
        Err(PoolError::Io(
            "the journal commit ended without an answer".into(),
        ))
    };
    tokio::select! {
        biased;
        r = &mut rx => {
            abandoned.0 = None;
            r.unwrap_or_else(|_| lost())
        }
        journal = group.journal.clone().lock_owned() => {
            abandoned.0 = None;
            if let Ok(r) = rx.try_recv() {
                return r;
            }
            tokio::spawn(drain(meta.clone(), journal));
            rx.await.unwrap_or_else(|_| lost())
        }
    }
}

/// Held by a caller until its records are sure to be taken (its answer came, or it started the task that drains
/// the queue): dropped before that, it starts a task that waits for the journal and drains the queue. The queue's
/// drain ends when it finds the queue empty, so records queued just after and left by a caller gone before it got
/// the journal would otherwise stay until someone else commits.
struct Abandoned<M: Metadata>(Option<Arc<M>>);

impl<M: Metadata> Drop for Abandoned<M> {
    fn drop(&mut self) {
        let Some(meta) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let journal = meta.group().journal.clone().lock_owned().await;
            drain(meta, journal).await;
        });
    }
}

/// Writes batches until the queue is empty, holding the journal.
async fn drain<M: Metadata>(meta: Arc<M>, mut journal: OwnedMutexGuard<Journal>) {
    loop {
        let taken: Vec<Waiting> = {
            let mut q = meta.group().queue();
            let n = q.len().min(MAX_BATCH);
            q.drain(..n).collect()
        };
        if taken.is_empty() {
            return;
        }
        let mut unfinished = Unfinished(meta.as_ref(), true);
        write_batch(&meta, &mut journal, taken).await;
        unfinished.1 = false;
    }
}

/// Faults the metadata if a batch is dropped half way (the runtime shut down under it).
struct Unfinished<'a, M: Metadata>(&'a M, bool);

impl<M: Metadata> Drop for Unfinished<'_, M> {
    fn drop(&mut self) {
        if self.1 {
            self.0.failed(&PoolError::Io(
                "a journal commit was dropped half way".into(),
            ));
        }
    }
}

async fn write_batch<M: Metadata>(meta: &Arc<M>, journal: &mut Journal, taken: Vec<Waiting>) {
    // Each caller's records are checked against the state they will be applied to; those that can no longer
    // follow it are refused before anything is written.
    let verdicts = meta.admit(&taken.iter().map(|w| &w.records[..]).collect::<Vec<_>>());
    let mut batch = Vec::with_capacity(taken.len());
    let mut refused = Vec::new();
    for (w, verdict) in taken.into_iter().zip(verdicts) {
        match verdict {
            Ok(()) => batch.push(w),
            Err(e) => refused.push((w, e)),
        }
    }
    let all: Vec<Record> = batch
        .iter()
        .flat_map(|w| w.records.iter().cloned())
        .collect();
    let written = if let Some(e) = meta.halted() {
        Err(e)
    } else if all.is_empty() {
        Ok(())
    } else {
        let r = journal.commit(|| meta.state(), &all).await;
        if let Err(e) = &r {
            meta.failed(e);
        }
        r
    };
    // A refused caller hears once the batch that refused it is applied (it may look again: a create refused
    // because the same create was ahead of it finds the volume).
    match written {
        Ok(()) => {
            for w in batch {
                let r = meta.apply(&w.records);
                if let Err(e) = &r {
                    // Admitted records always apply; if not, memory is behind the journal.
                    meta.failed(e);
                }
                let _ = w.done.send(r);
            }
        }
        Err(e) => {
            for w in batch {
                let _ = w.done.send(Err(e.clone()));
            }
        }
    }
    for (w, e) in refused {
        let _ = w.done.send(Err(e));
    }
}

impl GroupCommit {
    pub fn new(journal: Journal) -> GroupCommit {
        GroupCommit {
            journal: Arc::new(tokio::sync::Mutex::new(journal)),
            queue: Mutex::new(Vec::new()),
        }
    }

    /// Holds the journal as a commit in progress would: commits queue behind it.
    #[cfg(test)]
    pub async fn hold(&self) -> tokio::sync::MutexGuard<'_, Journal> {
        self.journal.lock().await
    }

    /// Callers' records waiting for the journal.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queue().len()
    }

    /// The journal's epoch (how many checkpoints it has written).
    #[cfg(test)]
    pub async fn epoch(&self) -> u64 {
        self.journal.lock().await.epoch()
    }

    /// Journal blocks used since the last checkpoint.
    #[cfg(test)]
    pub async fn used_blocks(&self) -> u64 {
        self.journal.lock().await.used_blocks()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}
