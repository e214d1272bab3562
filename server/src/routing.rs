//! Model-aware routing between nodes that share a state in PostgreSQL.
//!
//! - **Directory.** Every second each node writes its row in
//!   `gpuwasm_nodes`: its advertised URL, the content keys of the models
//!   resident on it, and its load (instances running plus requests
//!   queued). It reads the rows of the other nodes seen in the last
//!   [`FRESH`].
//! - **Choice** ([`choose`]). A request for a deployment that names models
//!   is served here when they are all resident here. Otherwise it goes to
//!   the least-loaded node that holds them all and has no request waiting.
//!   When every holder has requests waiting, a cold load here is cheaper
//!   than the wait, unless requests wait here too (then the holder with
//!   the fewest waiting gets it). When no node holds them, it goes to the
//!   least-loaded node (this one on a tie), which loads them.
//! - **One hop.** A forwarded request carries [`FORWARDED`]: the sending
//!   node's id and a SHA-256 of it keyed with the admin token, which every
//!   node sharing the state has. A request with a valid one is served where
//!   it lands, so requests never loop; clients cannot forge one to force
//!   cold loads. The header never reaches a guest. Nodes talk plain HTTP
//!   to each other, and give up connecting to a peer after
//!   [`CONNECT_TIMEOUT`].
//! - **Stale views.** A node whose own directory write fails (PostgreSQL
//!   down) stops routing after [`FRESH`]: what it knows of the others is
//!   then too old.

use crate::control::{Entry, constant_time_eq};
use crate::hex::sha256_hex;
use crate::{RequestBody, ServerInner};
use crate::error::Error;
use crate::postgres_store::{Load, NodeRow, PgNodes};
use gpuwasm::{ResponseBody, text_response};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The header a forwarded request carries: `ID MAC`, the id of the node it
/// came from and [`mac`] of it.
pub const FORWARDED: &str = "gpuwasm-forwarded-by";

/// The header a forwarded request's answer carries: the id of the node
/// that served it.
pub const FORWARDED_TO: &str = "gpuwasm-served-by";

/// How recently a node must have written its row to be routed to.
pub(crate) const FRESH: Duration = Duration::from_secs(3);

/// How long forwarding waits to connect to a peer.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// This node's place among the nodes.
pub(crate) struct Peers {
    /// This node's id in the directory.
    pub id: String,
    /// The URL the other nodes reach this one at.
    url: String,
    directory: PgNodes,
    /// The other nodes, and when they were read.
    others: RwLock<(Vec<NodeRow>, Instant)>,
    client: Client<HttpConnector, RequestBody>,
    /// Keys the forwarding header: the admin token, which every node has.
    secret: String,
}

impl Peers {
    pub(crate) fn new(url: String, directory: PgNodes, secret: String) -> std::io::Result<Peers> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        let others = RwLock::new((Vec::new(), Instant::now()));
        Ok(Peers { id: crate::hex::random_hex(8)?, url, directory, others, client, secret })
    }

    /// Writes this node's row and reads the others' (blocking).
    pub(crate) fn beat(&self, models: Vec<String>, load: Load) -> Result<(), Error> {
        let me = NodeRow { id: self.id.clone(), url: self.url.clone(), models, load };
        let others = self.directory.beat(&me, FRESH)?;
        *self.others.write().unwrap() = (others, Instant::now());
        Ok(())
    }

    /// The node a request for a deployment with `models` should go to
    /// ([`choose`] among the others as last read, if that is recent).
    fn choose(&self, models: &[String], resident: &HashSet<String>, here: Load) -> Option<NodeRow> {
        let others = self.others.read().unwrap();
        let (others, read_at) = &*others;
        (read_at.elapsed() < FRESH).then(|| choose(others, models, resident, here).cloned()).flatten()
    }

    /// Whether `header` is a forwarding header a node sharing the state made.
    fn genuine(&self, header: &http::HeaderValue) -> bool {
        let Some((id, tag)) = header.to_str().ok().and_then(|h| h.split_once(' ')) else { return false };
        constant_time_eq(tag.as_bytes(), mac(&self.secret, id).as_bytes())
    }

    /// Sends `request` to `node` and gives back its answer.
    pub(crate) async fn forward(&self, node: &NodeRow, mut request: Request<RequestBody>) -> Response<ResponseBody> {
        let target = format!("{}{}", node.url, request.uri().path_and_query().map_or("/", |p| p.as_str()));
        match target.parse::<Uri>() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(e) => return text_response(StatusCode::BAD_GATEWAY, format!("node {} has an unusable URL: {e}", node.id)),
        }
        let header = format!("{} {}", self.id, mac(&self.secret, &self.id));
        request.headers_mut().insert(FORWARDED, http::HeaderValue::from_str(&header).expect("hex and a space"));
        match self.client.request(request).await {
            Ok(response) => response.map(|body| body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) }).boxed_unsync()),
            Err(e) => {
                tracing::warn!(node = %node.id, url = %node.url, error = %e, "forwarding a request failed");
                text_response(StatusCode::BAD_GATEWAY, format!("the node holding this deployment's models did not answer: {e}"))
            }
        }
    }
}

/// The tag that proves a forwarding header came from a node with `secret`.
fn mac(secret: &str, id: &str) -> String {
    sha256_hex(format!("gpuwasm-forwarded-by\n{secret}\n{id}").as_bytes())
}

/// Where a request for a deployment with `models` goes among `others`:
/// `None` for this node, which holds `resident` and has load `here`.
fn choose<'a>(others: &'a [NodeRow], models: &[String], resident: &HashSet<String>, here: Load) -> Option<&'a NodeRow> {
    if models.iter().all(|m| resident.contains(m)) {
        return None;
    }
    let holders: Vec<&NodeRow> = others.iter().filter(|n| models.iter().all(|m| n.models.contains(m))).collect();
    if let Some(idle) = holders.iter().filter(|n| n.load.queued == 0).min_by_key(|n| n.load.total()) {
        return Some(idle);
    }
    if !holders.is_empty() {
        return match here.queued {
            0 => None,
            _ => holders.into_iter().min_by_key(|n| n.load.queued),
        };
    }
    others.iter().filter(|n| n.load.total() < here.total()).min_by_key(|n| n.load.total())
}

impl ServerInner {
    /// Answers `request` for `entry` from the node that holds its models,
    /// when that is another node; gives the request back to serve here.
    pub(crate) async fn elsewhere(&self, entry: &Entry, mut request: Request<RequestBody>) -> Result<Response<ResponseBody>, Request<RequestBody>> {
        let forwarded = request.headers_mut().remove(FORWARDED);
        let Some(peers) = &self.peers else { return Err(request) };
        let Some(version) = entry.active().filter(|v| !v.spec.models.is_empty()) else { return Err(request) };
        if forwarded.is_some_and(|header| peers.genuine(&header)) {
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

    /// Instances running and requests queued, over all deployments.
    fn load(&self) -> Load {
        let queued = self.control().deployments.values().filter_map(|e| e.live.as_ref()?.as_ref().ok()).map(|d| u64::from(d.queued())).sum();
        Load { running: u64::from(self.runtime.instances_running()), queued }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, models: &[&str], running: u64, queued: u64) -> NodeRow {
        let models = models.iter().map(|m| m.to_string()).collect();
        NodeRow { id: id.into(), url: format!("http://{id}"), models, load: Load { running, queued } }
    }

    fn chosen(others: &[NodeRow], resident: &[&str], here: Load) -> Option<String> {
        let models = ["m1".to_string(), "m2".to_string()];
        let resident = resident.iter().map(|m| m.to_string()).collect();
        choose(others, &models, &resident, here).map(|n| n.id.clone())
    }

    #[test]
    fn requests_go_where_their_models_are_unless_a_cold_load_is_cheaper() {
        let idle = Load::default();
        let busy = Load { running: 8, queued: 3 };
        let holders = [node("a", &["m1", "m2"], 5, 0), node("b", &["m1", "m2"], 2, 0), node("c", &["m1"], 0, 0)];
        assert_eq!(chosen(&holders, &["m1", "m2"], busy), None, "all resident here: served here, however busy");
        assert_eq!(chosen(&holders, &["m1"], idle), Some("b".into()), "the least-loaded node holding them all");

        let queueing = [node("a", &["m1", "m2"], 8, 4), node("b", &["m1", "m2"], 8, 2)];
        assert_eq!(chosen(&queueing, &[], idle), None, "every holder has requests waiting: load it here");
        assert_eq!(chosen(&queueing, &[], busy), Some("b".into()), "waiting here too: the holder with fewest waiting");
        let mixed = [node("a", &["m1", "m2"], 1, 3), node("b", &["m1", "m2"], 9, 0)];
        assert_eq!(chosen(&mixed, &[], idle), Some("b".into()), "a holder with nothing waiting wins over a less loaded one with a queue");

        let none = [node("a", &["m1"], 3, 0), node("b", &[], 1, 0)];
        assert_eq!(chosen(&none, &[], Load { running: 2, queued: 0 }), Some("b".into()), "no holder: the least-loaded node loads them");
        assert_eq!(chosen(&none, &[], Load { running: 1, queued: 0 }), None, "a tie stays here");
        assert_eq!(chosen(&[], &["m1"], busy), None, "alone: here");
    }
}
