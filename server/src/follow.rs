//! Following a control store that other nodes write to (PostgreSQL): the
//! state this node serves is brought up to the store's when the store says
//! another node committed, every [`RESYNC`] in case a notice was lost, and
//! before a change that lost a race with another node is decided again.
//!
//! A reload keeps the deployments this node already runs (same version
//! record) and loads the others from the blob store. A deployment no longer
//! active stops at once, as a removal on this node stops it. The same loop
//! writes this node's row in the node directory (`routing.rs`).

use crate::ServerInner;
use crate::control::Control;
use crate::error::Error;
use gpuwasm::Deployment;
use std::sync::Arc;
use std::time::Duration;

/// How often the store's revision is read even without a notice.
const RESYNC: Duration = Duration::from_secs(1);

impl ServerInner {
    /// Follows the store in the background, if other nodes write to it.
    pub(crate) fn follow_store(self: &Arc<Self>) -> Result<(), Error> {
        let changed = Arc::new(tokio::sync::Notify::new());
        if !self.store.watch(changed.clone())? {
            return Ok(());
        }
        let me = Arc::downgrade(self);
        tokio::spawn(gpuwasm::in_long_lane(async move {
            let mut failing = false;
            loop {
                let _ = tokio::time::timeout(RESYNC, changed.notified()).await;
                let Some(me) = me.upgrade() else { return };
                let outcome = {
                    let _guard = me.changes.lock().await;
                    me.reload().await
                };
                let outcome = outcome.and(me.beat().await);
                match &outcome {
                    Err(e) if !failing => tracing::warn!(error = %e, "cannot follow the control store; serving the state loaded last"),
                    Ok(()) if failing => tracing::info!("following the control store again"),
                    _ => {}
                }
                failing = outcome.is_err();
            }
        }));
        Ok(())
    }

    /// Brings the state this node serves up to the store's, if the store
    /// moved. Call it holding the change lock.
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<(), Error> {
        let me = self.clone();
        let revision = blocking(move || me.store.revision()).await?;
        if revision == self.control().revision {
            return Ok(());
        }
        let me = self.clone();
        let mut state = blocking(move || me.store.load()).await?;
        self.models.replace(std::mem::take(&mut state.models));
        for tenant in &state.tenants {
            self.runtime.models().set_tenant_gpu(&tenant.name, tenant.gpu);
            self.runtime.set_tenant_instances(&tenant.name, tenant.limits.instances);
        }
        let (me, old) = (self.clone(), self.control());
        let running = old.clone();
        let (control, loaded) = blocking(move || {
            let mut loaded = Vec::new();
            let control = Control::from_state(state, &me.config.server_names, |version| {
                let entry = running.deployments.get(&(version.tenant.clone(), version.name.clone()));
                match entry.filter(|e| e.active() == Some(version)).and_then(|e| e.live.clone()) {
                    Some(Ok(live)) => Ok(live),
                    _ => {
                        let live = me.load_logged(version)?;
                        loaded.push(live.clone());
                        Ok(live)
                    }
                }
            });
            Ok::<_, Error>((control, loaded))
        })
        .await?;
        let revision = control.revision;
        let control = Arc::new(control);
        *self.control.write().unwrap() = control.clone();
        for (key, entry) in &old.deployments {
            let still_active = control.deployments.get(key).is_some_and(|e| e.state.active.is_some());
            if let (Some(Ok(live)), false) = (&entry.live, still_active) {
                live.stop();
            }
        }
        warm_in_background(loaded);
        tracing::info!(revision, "control state reloaded: another node changed it");
        Ok(())
    }
}

/// Loads the models `deployments` keep warm, in the background.
fn warm_in_background(deployments: Vec<Deployment>) {
    if deployments.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for deployment in deployments {
            if let Err(e) = deployment.warm().await {
                tracing::error!(error = %e, "a model a deployment keeps warm failed to load");
            }
        }
    });
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Task(format!("control store task failed: {e}")))?
}
