//! Control planes for the API tests: store members in-process, each serving the API on its
//! own ephemeral port, and clients of them.

#![allow(dead_code)]

use std::time::Duration;

use flotilla_client::Client;
use flotilla_store::node::{ClusterState, StoreConfig, StoreNode};
use tokio::net::TcpListener;
use tokio::time::Instant;

pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Option<StoreNode>>,
    pub addrs: Vec<String>,
}

impl ControlPlane {
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}).await
    }

    pub async fn start_with(n: usize, tune: impl Fn(&mut StoreConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..n {
            peers.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
            clients.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let initial: Vec<(String, String)> = peers
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("n{}", i + 1), l.local_addr().unwrap().to_string()))
            .collect();
        let addrs: Vec<String> = clients
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let mut starts = Vec::new();
        for (i, peer) in peers.into_iter().enumerate() {
            let (name, peer_addr) = initial[i].clone();
            let mut config = StoreConfig::new(&name, dir.path().join(&name));
            config.peer_addr = peer_addr;
            config.client_addr = addrs[i].clone();
            config.initial_cluster = initial.clone();
            config.initial_cluster_state = ClusterState::New;
            tune(&mut config);
            starts
                .push(async move { StoreNode::start(config, peer).await.expect("member starts") });
        }
        let nodes = futures::future::join_all(starts).await;
        for (node, listener) in nodes.iter().zip(clients) {
            tokio::spawn(serve(node.clone(), listener));
        }
        let cp = Self {
            dir,
            nodes: nodes.into_iter().map(Some).collect(),
            addrs,
        };
        cp.wait_ready().await;
        cp
    }

    /// A client of every member, in order.
    pub fn client(&self) -> Client {
        Client::new(&self.addrs).unwrap()
    }

    /// A client of member `i` alone.
    pub fn client_of(&self, i: usize) -> Client {
        Client::new(&[self.addrs[i].clone()]).unwrap()
    }

    pub fn node(&self, i: usize) -> &StoreNode {
        self.nodes[i].as_ref().expect("member is running")
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await;
        }
    }

    /// Waits until the `default` namespace exists (a leader was elected and the API is up).
    async fn wait_ready(&self) {
        let client = self.client();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match client
                .get::<flotilla_proto::api::Namespace>("", "default")
                .await
            {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("the API did not come up: {e}"),
            }
        }
    }
}

async fn serve(node: StoreNode, listener: TcpListener) {
    let api = flotilla_apiserver::start(node.clone());
    let routes = flotilla_apiserver::add_routes(tonic::service::Routes::default(), api);
    let mut stop = node.shutdown_signal();
    let _ = tonic::transport::Server::builder()
        .layer(flotilla_apiserver::auth::layer::layer(
            Default::default(),
            &[],
        ))
        .serve_with_incoming_shutdown(
            routes,
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await;
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
