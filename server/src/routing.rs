//! Model-aware routing between nodes that share a state in PostgreSQL.
//!
//! - **Directory.** Every second each node writes its row in
//!   `gpuwasm_nodes`: its advertised URL, the content keys of the models
//!   resident on it, and its load (instances running plus requests
//!   queued). It reads the rows of the other nodes seen in the last
//!   [`FRESH`].
//! - **Choice.** A request for a deployment that names models is served
//!   here when they are all resident here. Otherwise it goes to the
//!   least-loaded node that holds them all. When no node holds them, it
//!   goes to the least-loaded node (this one on a tie), which loads them.
//! - **One hop.** A forwarded request carries [`FORWARDED`] and is always
//!   served where it lands, so requests never loop. Nodes talk plain HTTP
//!   to each other.

use crate::control::Entry;
use crate::{RequestBody, ServerInner};
use crate::error::Error;
use crate::postgres_store::{NodeRow, PgNodes};
use gpuwasm::{ResponseBody, text_response};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The header a forwarded request carries: the id of the node it came from.
pub const FORWARDED: &str = "gpuwasm-forwarded-by";

/// The header a forwarded request's answer carries: the id of the node
/// that served it.
pub const FORWARDED_TO: &str = "gpuwasm-served-by";

/// How recently a node must have written its row to be routed to.
pub(crate) const FRESH: Duration = Duration::from_secs(3);

/// This node's place among the nodes.
pub(crate) struct Peers {
    /// This node's id in the directory.
    pub id: String,
    /// The URL the other nodes reach this one at.
    url: String,
    directory: PgNodes,
    /// The other nodes, as last read.
    others: RwLock<Vec<NodeRow>>,
    client: Client<HttpConnector, RequestBody>,
}

impl Peers {
    pub(crate) fn new(url: String, directory: PgNodes) -> std::io::Result<Peers> {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Ok(Peers { id: crate::hex::random_hex(8)?, url, directory, others: RwLock::new(Vec::new()), client })
    }

    /// Writes this node's row and reads the others' (blocking).
    pub(crate) fn beat(&self, models: Vec<String>, load: u64) -> Result<(), Error> {
        let me = NodeRow { id: self.id.clone(), url: self.url.clone(), models, load };
        let others = self.directory.beat(&me, FRESH)?;
        *self.others.write().unwrap() = others;
        Ok(())
    }

    /// The node a request for a deployment with `models` should go to:
    /// `None` for this one. `resident` is what this node holds, `load` its
    /// load.
    pub(crate) fn choose(&self, models: &[String], resident: &HashSet<String>, load: u64) -> Option<NodeRow> {
        if models.iter().all(|m| resident.contains(m)) {
            return None;
        }
        let others = self.others.read().unwrap();
        let holders = others.iter().filter(|n| models.iter().all(|m| n.models.contains(m)));
        if let Some(holder) = holders.min_by_key(|n| n.load) {
            return Some(holder.clone());
        }
        others.iter().filter(|n| n.load < load).min_by_key(|n| n.load).cloned()
    }

    /// Sends `request` to `node` and gives back its answer.
    pub(crate) async fn forward(&self, node: &NodeRow, mut request: Request<RequestBody>) -> Response<ResponseBody> {
        let target = format!("{}{}", node.url, request.uri().path_and_query().map_or("/", |p| p.as_str()));
        match target.parse::<Uri>() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(e) => return text_response(StatusCode::BAD_GATEWAY, format!("node {} has an unusable URL: {e}", node.id)),
        }
        request.headers_mut().insert(FORWARDED, http::HeaderValue::from_str(&self.id).expect("ids are hex"));
        match self.client.request(request).await {
            Ok(response) => response.map(|body| body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) }).boxed_unsync()),
            Err(e) => {
                tracing::warn!(node = %node.id, url = %node.url, error = %e, "forwarding a request failed");
                text_response(StatusCode::BAD_GATEWAY, format!("the node holding this deployment's models did not answer: {e}"))
            }
        }
    }
}

impl ServerInner {
    /// Answers `request` for `entry` from the node that holds its models,
    /// when that is another node; gives the request back to serve here.
    pub(crate) async fn elsewhere(&self, entry: &Entry, request: Request<RequestBody>) -> Result<Response<ResponseBody>, Request<RequestBody>> {
        let Some(peers) = &self.peers else { return Err(request) };
        let Some(version) = entry.active().filter(|v| !v.spec.models.is_empty()) else { return Err(request) };
        if request.headers().contains_key(FORWARDED) {
            return Err(request);
        }
        let models: Vec<String> = version.spec.models.iter().filter_map(|name| self.models.key_of(&version.tenant, name)).collect();
        if models.is_empty() {
            return Err(request);
        }
        let resident: HashSet<String> = self.runtime.models().resident().into_iter().map(|m| m.key).collect();
        let Some(node) = peers.choose(&models, &resident, self.load()) else { return Err(request) };
        let mut response = peers.forward(&node, request).await;
        response.headers_mut().insert(FORWARDED_TO, http::HeaderValue::from_str(&node.id).expect("ids are hex"));
        Ok(response)
    }

    /// Instances running plus requests queued, over all deployments.
    fn load(&self) -> u64 {
        let queued: u64 = self.control().deployments.values().filter_map(|e| e.live.as_ref()?.as_ref().ok()).map(|d| u64::from(d.queued())).sum();
        u64::from(self.runtime.instances_running()) + queued
    }

    /// Tells the other nodes what this one holds, and learns what they do.
    pub(crate) async fn beat(self: &Arc<Self>) -> Result<(), Error> {
        if self.peers.is_none() {
            return Ok(());
        }
        let models = self.runtime.models().resident().into_iter().map(|m| m.key).collect();
        let (me, load) = (self.clone(), self.load());
        tokio::task::spawn_blocking(move || me.peers.as_ref().expect("checked above").beat(models, load))
            .await
            .map_err(|e| Error::Task(format!("the node directory task failed: {e}")))?
    }
}
