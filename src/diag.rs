//! Per-node diagnostics on core NATS, addressed to one node by name (unlike the API, whose
//! queue group lets any node answer):
//! - `kiln.node.<name>.echo` replies with what it got: the plain NATS request/reply floor.
//! - `kiln.node.<name>.ping` (`{"peer", "count"}`) makes this node time `count` actor calls to
//!   `peer`'s control actor through the actor cluster, interleaved with `count` NATS requests to
//!   `peer`'s echo, and reply with both distributions ([`PingReport`]); `kiln ping` prints it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_actors::node_control::call_node;
use kiln_actors::wire::NodeControlRequest;
use kiln_core::nats::{Resources, StoreError};
use kiln_core::protocol::{ApiError, PingReport, PingRequest};
use kiln_core::task::{self, TaskGuard, TaskKind};

const MAX_PINGS: u32 = 100_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves this node's diagnostic subjects until the returned task is aborted or dropped.
pub async fn serve(resources: Resources, node: String) -> Result<TaskGuard<()>, StoreError> {
    let client = resources.client.clone();
    let mut echo = client.subscribe(resources.names.node_diag(&node, "echo")).await.map_err(StoreError::nats)?;
    let mut ping = client.subscribe(resources.names.node_diag(&node, "ping")).await.map_err(StoreError::nats)?;
    Ok(task::spawn(TaskKind::OwnerLoop, "diagnostics", async move {
        loop {
            tokio::select! {
                Some(msg) = echo.next() => {
                    if let Some(reply) = msg.reply {
                        let _ = client.publish(reply, msg.payload).await;
                    }
                }
                Some(msg) = ping.next() => {
                    let Some(reply) = msg.reply else { continue };
                    let (resources, node, client) = (resources.clone(), node.clone(), client.clone());
                    task::spawn(TaskKind::Reply, "ping", async move {
                        let body = match serde_json::from_slice::<PingRequest>(&msg.payload) {
                            Ok(req) => match measure(&resources, &node, req).await {
                                Ok(report) => serde_json::to_vec(&report),
                                Err(e) => serde_json::to_vec(&serde_json::json!({ "error": e })),
                            },
                            Err(e) => serde_json::to_vec(&serde_json::json!({ "error": ApiError::bad_request(e.to_string()) })),
                        };
                        let _ = client.publish(reply, body.expect("json").into()).await;
                    });
                }
                else => return,
            }
        }
    }))
}

async fn measure(resources: &Resources, node: &str, req: PingRequest) -> Result<PingReport, ApiError> {
    if req.count == 0 || req.count > MAX_PINGS {
        return Err(ApiError::bad_request(format!("count must be 1..={MAX_PINGS}")));
    }
    if !kiln_core::ids::is_valid_token(&req.peer) || req.peer == node {
        return Err(ApiError::bad_request(format!("{:?} is not another node's name", req.peer)));
    }
    let echo = resources.names.node_diag(&req.peer, "echo");
    let (mut actor, mut nats) = (Vec::with_capacity(req.count as usize), Vec::with_capacity(req.count as usize));
    // A few unmeasured rounds first: connection buffers, the process group lookup.
    for i in 0..req.count + 20 {
        let t = Instant::now();
        call_node(&req.peer, NodeControlRequest::Ping, CALL_TIMEOUT)
            .await
            .ok_or_else(|| ApiError::internal(format!("no actor-cluster session with {:?}", req.peer)))?;
        let a = t.elapsed();
        let t = Instant::now();
        tokio::time::timeout(CALL_TIMEOUT, resources.client.request(echo.clone(), "ping".into()))
            .await
            .map_err(|_| ApiError::internal("echo timed out"))?
            .map_err(|e| ApiError::internal(format!("echo failed: {e}")))?;
        let n = t.elapsed();
        if i >= 20 {
            actor.push(a);
            nats.push(n);
        }
    }
    let q = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_micros() as u64
    };
    Ok(PingReport {
        from: node.to_string(),
        peer: req.peer,
        count: req.count,
        actor_p50_us: q(&mut actor, 0.50),
        actor_p99_us: q(&mut actor, 0.99),
        nats_p50_us: q(&mut nats, 0.50),
        nats_p99_us: q(&mut nats, 0.99),
    })
}
