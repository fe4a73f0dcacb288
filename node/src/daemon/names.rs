//! Standalone mode's follower of DNS answers: when a server name resolves to a new address
//! set, the snapshot is rebuilt from the config it serves, exactly as a config change would be
//! (see [`crate::resolve`] for the protocol; cluster mode does the same in its follow loop).

use std::sync::Arc;

use tokio::sync::watch;

use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::sticky::StickyRuntime;

/// Rebuilds `snapshot` on every new answer of its resolver until `stop`.
pub async fn follow(snapshot: SharedSnapshot, sticky: Arc<StickyRuntime>, mut stop: watch::Receiver<bool>) {
    let names = snapshot.load().names.clone();
    let mut answers = names.changed();
    // An answer that changed between the first snapshot and this subscription would otherwise
    // wait for the next change: one rebuild at start covers it.
    answers.mark_changed();
    loop {
        tokio::select! {
            changed = answers.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
        let current = snapshot.load_full();
        let built = Snapshot::build((*current.config).clone(), Some(&current), &names)
            .map_err(|e| e.to_string())
            .and_then(|mut next| next.attach_sticky(&sticky).map(|()| next).map_err(|e| e.to_string()));
        match built {
            Ok(next) => {
                snapshot.store(Arc::new(next));
                for pool in snapshot.load().pools.values() {
                    crate::health::spawn(pool);
                }
            }
            Err(e) => tracing::error!(target: "keel::dns", error = %e,
                "cannot apply a new DNS answer; keeping the previous servers"),
        }
    }
}
