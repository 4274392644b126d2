//! Watching folders for changed files, debounced: the one watcher behind the server's plugin
//! and pipeline hot reload and `staircase plugin dev`. Changes are collected until the
//! folders stay quiet for a while, then handed over as one batch, each path once with the
//! time of its first event. Reads are not changes (a build or a reload opens the files it
//! watches; counting those would loop); a close after writing is (it ends a `cp`). The
//! notify debouncer crates hand over reads too, and without their kind, hence this one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};

/// Changed paths, each with when its first event of the batch came.
pub type Batch = BTreeMap<PathBuf, Instant>;

/// One folder alone, without its subfolders (plugin and pipeline folders).
pub fn flat(dirs: &[PathBuf]) -> Vec<(PathBuf, RecursiveMode)> {
    dirs.iter()
        .map(|dir| (dir.clone(), RecursiveMode::NonRecursive))
        .collect()
}

/// A running watch; dropping it stops the watcher and ends its thread.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// Watches each folder of `dirs` (with its subfolders when its mode is recursive) and calls
/// `on_batch` on a thread named `thread` once `quiet` passes without a change after one; the
/// thread ends when the watch is dropped or `on_batch` returns `false`.
pub fn watch(
    dirs: &[(PathBuf, RecursiveMode)],
    quiet: Duration,
    thread: &str,
    mut on_batch: impl FnMut(Batch) -> bool + Send + 'static,
) -> Result<Watch, notify::Error> {
    let (tx, rx) = mpsc::channel::<(PathBuf, Instant)>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            let now = Instant::now();
            for path in event.paths {
                let _ = tx.send((path, now));
            }
        }
    })?;
    for (dir, mode) in dirs {
        watcher.watch(dir, *mode)?;
    }
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            while let Some(batch) = next_batch(&rx, quiet) {
                if !on_batch(batch) {
                    return;
                }
            }
        })
        .map_err(|e| notify::Error::generic(&format!("{thread} thread: {e}")))?;
    Ok(Watch { _watcher: watcher })
}

/// Waits for a change, then collects changes until `quiet` passes without one; `None` once
/// the watcher is gone.
fn next_batch(rx: &Receiver<(PathBuf, Instant)>, quiet: Duration) -> Option<Batch> {
    let (first, at) = rx.recv().ok()?;
    let mut batch = Batch::new();
    batch.insert(first, at);
    loop {
        match rx.recv_timeout(quiet) {
            Ok((path, at)) => {
                batch.entry(path).or_insert(at);
            }
            Err(RecvTimeoutError::Timeout) => return Some(batch),
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_each_path_once_with_its_first_time() {
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        tx.send((PathBuf::from("a"), t0)).unwrap();
        tx.send((PathBuf::from("b"), t1)).unwrap();
        tx.send((PathBuf::from("a"), t1)).unwrap();
        let batch = next_batch(&rx, Duration::from_millis(1)).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[&PathBuf::from("a")], t0);
        drop(tx);
        assert!(next_batch(&rx, Duration::from_millis(1)).is_none());
    }

    #[test]
    fn a_written_file_is_reported_and_the_watch_stops_when_dropped() {
        let dir = std::env::temp_dir().join(format!("staircase-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (tx, batches) = mpsc::channel();
        let watch = watch(
            &flat(std::slice::from_ref(&dir)),
            Duration::from_millis(20),
            "test-watch",
            move |b| tx.send(b).is_ok(),
        )
        .unwrap();
        std::fs::write(dir.join("x.toml"), "x").unwrap();
        let batch = batches.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(batch.contains_key(&dir.join("x.toml")), "{batch:?}");
        drop(watch);
        // The thread ends with the watcher, dropping the sender it holds.
        loop {
            match batches.recv_timeout(Duration::from_secs(60)) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("the watch thread outlived its watch"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
