//! The deploy pipeline: a [`DeploymentSpec`] and component bytes become a
//! version record and a live [`Deployment`]; a stored version record
//! becomes a live deployment again (rollback, start-up). Everything that
//! can be checked cheaply is checked before anything is built or stored:
//!
//! 1. validate the component (`Runtime::validate`, when there are files to
//!    assemble before it compiles) and the limits;
//! 2. check the files (paths, uploaded blobs) and assemble their tree;
//! 3. resolve the runtime [`Capabilities`] (files, model access, env,
//!    outbound hosts);
//! 4. pre-initialise (`Runtime::preinitialize`) when the spec says so;
//! 5. compile and store the artifact content-addressed, or map the cached one;
//! 6. link (`Runtime::deployment`), instantiate once (`Deployment::check`)
//!    and load the models it keeps warm (`Deployment::warm`).

use crate::ServerInner;
use crate::control_store::VersionRecord;
use crate::error::Error;
use crate::spec::DeploymentSpec;
use bytes::Bytes;
use gpuwasm::{Capabilities, Deployment};
use std::sync::Arc;

impl ServerInner {
    /// Builds the version `draft` describes from `wasm` (its hashes are
    /// filled in) and its live deployment, checked to start.
    pub(crate) async fn build_version(self: &Arc<Self>, draft: VersionRecord, wasm: Bytes) -> Result<(VersionRecord, Deployment), Error> {
        let me = self.clone();
        let (version, deployment) = tokio::task::spawn_blocking(move || me.build_blocking(draft, &wasm))
            .await
            .map_err(|e| Error::Task(format!("deploy task failed: {e}")))??;
        deployment.check().await?;
        deployment.warm().await?;
        Ok((version, deployment))
    }

    fn build_blocking(&self, version: VersionRecord, wasm: &[u8]) -> Result<(VersionRecord, Deployment), Error> {
        // Files are assembled before the component is compiled (its init
        // may read them): refuse garbage before building anything. Without
        // files, compiling validates it first anyway.
        if !version.spec.files.is_empty() {
            self.runtime.validate(wasm)?;
        }
        version.spec.limits.validate(self.runtime.max_limits())?;
        self.files.check(&version.tenant, &version.spec.files).map_err(Error::InvalidFiles)?;
        let capabilities = self.capabilities(&version.tenant, &version.spec)?;
        let snapshot = match version.spec.preinit {
            true => self.runtime.preinitialize(wasm, &version.spec.limits, &capabilities)?,
            false => None,
        };
        let (version, compiled) = match snapshot {
            None => {
                let (sha256, compiled) = self.artifacts.store(&self.runtime, wasm)?;
                (VersionRecord { sha256, ..version }, compiled)
            }
            Some(snapshot) => {
                let (snapshot_sha256, compiled) = self.artifacts.store(&self.runtime, &snapshot)?;
                let sha256 = self.artifacts.put_source(wasm)?;
                (VersionRecord { sha256, snapshot_sha256: Some(snapshot_sha256), ..version }, compiled)
            }
        };
        let deployment = self.runtime.deployment(&version.name, &compiled, version.spec.limits.clone(), capabilities)?;
        Ok((version, deployment))
    }

    /// The live deployment of a stored version (blocking): its artifact
    /// mapped (or compiled again from the stored component), its files
    /// assembled.
    pub(crate) fn load_version(self: &Arc<Self>, version: &VersionRecord) -> Result<Deployment, Error> {
        let runs = version.snapshot_sha256.as_ref().unwrap_or(&version.sha256);
        let compiled = self.artifacts.component(&self.runtime, runs)?;
        let capabilities = self.capabilities(&version.tenant, &version.spec)?;
        let deployment = self.runtime.deployment(&version.name, &compiled, version.spec.limits.clone(), capabilities)?;
        self.observe(&deployment, version);
        Ok(deployment)
    }

    /// [`ServerInner::load_version`], its error logged and kept as text
    /// (what a deployment that failed to load answers with).
    pub(crate) fn load_logged(self: &Arc<Self>, version: &VersionRecord) -> Result<Deployment, String> {
        self.load_version(version).map_err(|e| {
            tracing::error!(tenant = %version.tenant, deployment = %version.name, version = version.version, error = %e, "deployment failed to load");
            e.to_string()
        })
    }

    /// Loads, in the background, the models the active deployments keep
    /// warm (at start-up; until they are loaded, a request loads its model
    /// as it would without).
    pub(crate) fn warm_active(&self) {
        let control = self.control();
        let live: Vec<(String, String, Deployment)> = control
            .deployments
            .iter()
            .filter_map(|((tenant, name), entry)| match &entry.live {
                Some(Ok(deployment)) => Some((tenant.clone(), name.clone(), deployment.clone())),
                _ => None,
            })
            .collect();
        tokio::spawn(async move {
            for (tenant, name, deployment) in live {
                if let Err(e) = deployment.warm().await {
                    tracing::error!(%tenant, deployment = %name, error = %e, "a model it keeps warm failed to load");
                }
            }
        });
    }

    /// Watches the requests of `deployment`, serving `version`: keeps what
    /// its guests print for `gpuwasm logs`, and meters them (usage records
    /// and request metrics) when the server meters.
    pub(crate) fn observe(self: &Arc<Self>, deployment: &Deployment, version: &VersionRecord) {
        let (me, tenant, name, number) = (Arc::downgrade(self), version.tenant.clone(), version.name.clone(), version.version);
        deployment.set_log_sink(Arc::new(move |log| {
            if let Some(me) = me.upgrade() {
                me.logs.add(&tenant, &name, number, log);
            }
        }));
        if let Some(metering) = &self.metering {
            let metrics = self.metrics.deployment(&version.tenant, &version.name);
            let recorder = metering.recorder(&version.tenant, &version.name, version.version, metrics);
            deployment.set_usage_sink(Arc::new(move |usage| recorder.record(usage)));
        }
    }

    /// What a deployment of `tenant` with `spec` may reach on this node.
    fn capabilities(&self, tenant: &str, spec: &DeploymentSpec) -> Result<Capabilities, Error> {
        Ok(Capabilities {
            env: spec.sandbox.env.clone(),
            outbound: spec.sandbox.outbound.clone(),
            files: self.files.tree(tenant, &spec.files)?,
            models: spec.model_access(tenant, Some(self.models.clone())),
        })
    }
}
