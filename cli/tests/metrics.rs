//! `/metrics`, `/healthz` and `/readyz` on each member's client port (HTTP/1.1 next to
//! gRPC).

mod common;

use common::{Cluster, eventually, http_get};

#[test]
fn members_serve_metrics_health_and_readiness() {
    let cluster = Cluster::start();
    let leader = cluster.leader();
    for m in &cluster.members {
        assert_eq!(http_get(&m.client, "/healthz"), (200, "ok\n".to_string()));
        let (code, body) = http_get(&m.client, "/readyz");
        assert_eq!(code, 200, "{body}");
    }
    // A request to time.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "get",
            "namespaces",
            "--server",
            &cluster.members[leader].client,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let addr = cluster.members[leader].client.clone();
    eventually("the leader's metrics", || {
        let (code, body) = http_get(&addr, "/metrics");
        code == 200
            && body.contains("\nflotilla_raft_is_leader 1\n")
            && body.contains("# TYPE flotilla_raft_term gauge")
            && body.contains("flotilla_proposals_committed_total")
            && body.contains(
                "flotilla_grpc_request_duration_seconds_count{method=\"/flotilla.api.v1.Namespaces/List\"} ",
            )
            && body.contains("flotilla_controller_reconciles_total")
            && body.contains("flotilla_scheduler_pending_pods 0")
    });
    let follower = (leader + 1) % 3;
    let (_, body) = http_get(&cluster.members[follower].client, "/metrics");
    assert!(body.contains("\nflotilla_raft_is_leader 0\n"), "{body}");
    assert!(body.contains("\nflotilla_raft_has_leader 1\n"), "{body}");
}
