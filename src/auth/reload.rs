//! Values built from files and rebuilt when the files change: TLS
//! certificates, keys and CAs, and the JWKS.
//!
//! Polled rather than watched with inotify: Kubernetes updates a mounted
//! secret by swapping a symlink (`..data`), which file-level watches miss,
//! while re-reading a few small files every few seconds costs nothing. A
//! file that fails to build keeps the previous value (and is logged), so a
//! half-written rotation never takes bfb down.

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

/// A value rebuilt from its files when they change. Readers load it
/// lock-free.
pub type Reloading<T> = Arc<ArcSwap<T>>;

/// Builds a value from `paths` now (an error is returned: bad files at start
/// are fatal), then re-reads them every `interval` and swaps in a new value
/// when their bytes changed. The poller stops when the value is dropped.
pub fn watch<T, F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    build: F,
) -> Result<Reloading<T>, String>
where
    T: Send + Sync + 'static,
    F: Fn(&[Vec<u8>]) -> Result<T, String> + Send + 'static,
{
    let mut last = read_all(&paths)?;
    let value = Arc::new(ArcSwap::from_pointee(build(&last)?));
    let weak = Arc::downgrade(&value);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(value) = weak.upgrade() else { return };
            let contents = match read_all(&paths) {
                Ok(c) if c == last => continue,
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(what, error = %e, "cannot re-read; keeping the current one");
                    continue;
                }
            };
            match build(&contents) {
                Ok(v) => {
                    value.store(Arc::new(v));
                    tracing::info!(what, "reloaded after its files changed");
                }
                Err(e) => {
                    tracing::warn!(what, error = %e, "changed files are unusable; keeping the current one")
                }
            }
            last = contents;
        }
    });
    Ok(value)
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_is_rebuilt_and_a_broken_one_keeps_the_old_value() {
        let dir = std::env::temp_dir().join(format!("bfb-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("value");
        std::fs::write(&file, "1").expect("write");
        let parse = |c: &[Vec<u8>]| {
            String::from_utf8_lossy(&c[0])
                .parse::<u32>()
                .map_err(|e| e.to_string())
        };
        let v = watch("test", vec![file.clone()], Duration::from_secs(5), parse).expect("built");
        assert_eq!(**v.load(), 1);
        std::fs::write(&file, "2").expect("write");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(**v.load(), 2);
        std::fs::write(&file, "not a number").expect("write");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(**v.load(), 2, "kept");
        std::fs::write(&file, "3").expect("write");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(**v.load(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
