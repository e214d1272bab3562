//! The collector: removes what nothing refers to, now and then. File trees
//! no active deployment uses; blobs no record refers to (deployment files,
//! model files, components); compiled artifacts of components no version
//! runs. Only what is older than the grace period goes (uploads come before
//! the deploy or push that uses them); what any version refers to stays,
//! for rollback.

use crate::ServerInner;
use crate::control::Entry;
use crate::control_store::VersionRecord;
use crate::files::FileStore;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

impl ServerInner {
    /// Starts the collector: once now, then every quarter of the grace
    /// period (at least a second, at most ten minutes), until the server
    /// is dropped.
    pub(crate) fn start_collector(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = (self.config.gc_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = tokio::task::spawn_blocking(move || inner.collect_garbage()).await {
                    tracing::error!(error = %e, "garbage collection failed");
                }
                tokio::time::sleep(period).await;
            }
        });
    }

    fn collect_garbage(&self) {
        let control = self.control();
        let grace = self.config.gc_grace;
        let active: Vec<&VersionRecord> = control.deployments.values().filter_map(Entry::active).collect();
        self.files.remove_unused_trees(active.iter().map(|v| (v.tenant.as_str(), &v.spec.files)), grace);
        let running: HashSet<&str> = active.iter().map(|v| v.snapshot_sha256.as_deref().unwrap_or(&v.sha256)).collect();
        self.artifacts.retain_loaded(&running);

        let mut components = HashSet::new();
        let mut referenced = HashSet::new();
        for v in control.deployments.values().flat_map(|e| e.versions.values()) {
            referenced.extend(v.spec.files.values().map(|sha| FileStore::blob_key(&v.tenant, sha)));
            components.extend([v.sha256.as_str()].into_iter().chain(v.snapshot_sha256.as_deref()));
        }
        referenced.extend(components.iter().map(|sha| crate::artifacts::source_key(sha)));
        referenced.extend(self.models.blob_keys());
        self.artifacts.remove_unused(&components, grace);
        for prefix in ["files/", "models/", "components/"] {
            let blobs = match self.blobs.list(prefix) {
                Ok(blobs) => blobs,
                Err(e) => {
                    tracing::warn!(error = %e, "listing blobs for garbage collection failed");
                    continue;
                }
            };
            for blob in blobs {
                let old = blob.stored_at.elapsed().is_ok_and(|age| age >= grace);
                if old && !referenced.contains(&blob.key) {
                    match self.blobs.delete(&blob.key) {
                        Ok(()) => tracing::info!(key = %blob.key, bytes = blob.size, "removed a blob nothing refers to"),
                        Err(e) => tracing::warn!(key = %blob.key, error = %e, "removing an unreferenced blob failed"),
                    }
                }
            }
        }
    }
}
