//! Flotilla's controllers, run on the Raft leader as clients of the API.
//!
//! One shape for all: shared informers feed de-duplicating work queues of keys
//! ([`queue`]); a worker reads the current state from the informers' caches, computes the
//! difference to the desired state, writes through the API with optimistic concurrency,
//! and on conflict or error queues the key again with back-off.
//!
//! - [`replicaset`]: keeps `replicas` pods matching the selector, adopts orphans, uses
//!   expectations so it never over-creates while its own writes are in flight;
//! - [`deployment`]: one ReplicaSet per pod-template hash, rolling update and recreate,
//!   revision history, status and conditions;
//! - [`nodelifecycle`]: nodes whose Lease is not renewed go `Ready=Unknown`, get a
//!   NoExecute taint, and their pods are evicted after their toleration time;
//! - [`gc`]: owner references drive background, foreground and orphan deletion;
//! - [`endpoints`]: a Service's selector → its ready pods' addresses and ports;
//! - [`namespace`]: a terminating namespace is emptied, then removed.
//! - [`quota`]: ResourceQuotas' usage recounted, so deletions give their share back;
//! - [`job`]: a Job's pods run to `completions`, within `parallelism`, `backoffLimit` and
//!   `activeDeadlineSeconds`; finished Jobs go after `ttlSecondsAfterFinished`;
//! - [`cronjob`]: a CronJob's Jobs start on its schedule, within its concurrency policy
//!   and starting deadline; finished ones past the history limits are deleted;
//! - [`daemonset`]: one pod per eligible node, following nodes that join and leave, with
//!   rolling updates;
//! - [`disruption`]: PodDisruptionBudgets' status, which evictions (and so drains) obey.
//!
//! [`runtime`] is the shape new controllers take (a [`runtime::Controller`] registered in
//! [`controllers`] with the kinds it owns, reading and writing through [`runtime::Api`],
//! unit tested on `fake::FakeApi`, a test-only module); the replicaset, deployment, node
//! lifecycle, gc, endpoints, namespace and quota controllers predate it.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
#[cfg(test)]
pub mod fake;
pub mod gc;
pub mod job;
pub mod namespace;
pub mod nodelifecycle;
pub mod queue;
pub mod quota;
pub mod replicaset;
pub mod runtime;
pub mod util;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flotilla_client::Client;
use flotilla_client::informer::{Change, Filter, Informer};
use flotilla_proto::api::{
    CronJob, DaemonSet, Deployment, Endpoints, Job, Lease, Namespace, Node, Pod,
    PodDisruptionBudget, ReplicaSet, Resource, ResourceQuota, Service,
};
use tokio::sync::watch;

use crate::queue::WorkQueue;
use crate::runtime::{For, Live, Running, Subscribers};

/// Every controller of the [`runtime`] shape, with the kinds it owns.
pub fn controllers(subs: &mut Subscribers) -> Vec<Box<dyn Running>> {
    vec![
        For::new(job::JobController::default())
            .owns::<Pod>()
            .register(subs),
        For::new(cronjob::CronJobController)
            .owns::<Job>()
            .register(subs),
        For::new(daemonset::DaemonSetController::default())
            .owns::<Pod>()
            .watches_all::<Node>(daemonset::node_changed)
            .register(subs),
        For::new(disruption::DisruptionController)
            .watches_all::<Pod>(disruption::pod_changed)
            .register(subs),
    ]
}

/// Where node agents keep their Leases (one per node, named after it).
pub const NODE_LEASE_NAMESPACE: &str = flotilla_proto::api::NODE_LEASE_NAMESPACE;

#[derive(Clone, Debug)]
pub struct Config {
    /// A node whose Lease is not renewed for this long is marked unreachable.
    pub node_monitor_grace: Duration,
    /// How long pods without a toleration of the unreachable taint stay on such a node.
    pub default_toleration: Duration,
    /// Workers per controller.
    pub workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_monitor_grace: Duration::from_secs(8),
            default_toleration: Duration::from_secs(5),
            workers: 4,
        }
    }
}

/// Counters an operator reads.
#[derive(Debug, Default)]
pub struct Stats {
    pub reconciles: AtomicU64,
    pub errors: AtomicU64,
    /// Keys waiting, all controllers together (sampled).
    pub queue_depth: AtomicU64,
}

/// Declares [`Informers`] from one list of its fields and their kinds.
macro_rules! informers {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// The informers every controller reads from.
        pub struct Informers {
            $(pub $field: Informer<$ty>,)*
        }

        impl Informers {
            /// The informer of kind `K`, if one runs.
            pub fn of<K: Resource>(&self) -> Option<&Informer<K>> {
                use std::any::Any;
                $(if let Some(i) = (&self.$field as &dyn Any).downcast_ref::<Informer<K>>() {
                    return Some(i);
                })*
                None
            }

            fn has(&self, kind: &str) -> bool {
                false $(|| kind == <$ty>::KIND)*
            }

            async fn wait_synced(&self) {
                $(self.$field.wait_synced().await;)*
            }
        }
    };
}

informers! {
    pods: Pod,
    replica_sets: ReplicaSet,
    deployments: Deployment,
    nodes: Node,
    leases: Lease,
    services: Service,
    endpoints: Endpoints,
    namespaces: Namespace,
    quotas: ResourceQuota,
    jobs: Job,
    cron_jobs: CronJob,
    daemon_sets: DaemonSet,
    disruption_budgets: PodDisruptionBudget,
}

/// What the controllers share: the client, the informers, their queues.
pub struct Ctx {
    pub client: Client,
    pub config: Config,
    informers: OnceLock<Informers>,
    pub replicaset: replicaset::Controller,
    pub deployment: Arc<WorkQueue>,
    pub gc: Arc<WorkQueue>,
    pub endpoints: Arc<WorkQueue>,
    pub namespace: Arc<WorkQueue>,
    pub quota: Arc<WorkQueue>,
    pub nodelifecycle: nodelifecycle::Controller,
    pub stats: Arc<Stats>,
    /// Handlers of the [`runtime`] controllers, per kind.
    subscribers: Subscribers,
    registered: Vec<Box<dyn Running>>,
}

impl Ctx {
    /// The informers; set before any worker runs (handlers check [`Ctx::try_informers`]).
    pub fn informers(&self) -> &Informers {
        self.informers
            .get()
            .expect("informers start before workers")
    }

    pub fn try_informers(&self) -> Option<&Informers> {
        self.informers.get()
    }
}

/// Runs every controller until `stop` turns true.
pub async fn run(client: Client, config: Config, stats: Arc<Stats>, stop: watch::Receiver<bool>) {
    let mut subscribers = Subscribers::default();
    let registered = controllers(&mut subscribers);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        config,
        informers: OnceLock::new(),
        replicaset: replicaset::Controller::new(),
        deployment: WorkQueue::new("deployment"),
        gc: WorkQueue::new("garbage-collector"),
        endpoints: WorkQueue::new("endpoints"),
        namespace: WorkQueue::new("namespace"),
        quota: WorkQueue::new("resourcequota"),
        nodelifecycle: nodelifecycle::Controller::new(),
        stats,
        subscribers,
        registered,
    });
    let all = Filter::default;
    let informers = Informers {
        pods: start(&ctx, client.clone(), all(), |ctx, c: &Change<Pod>| {
            replicaset::on_pod(ctx, c);
            gc::on_dependent(ctx, c);
            endpoints::on_pod(ctx, c);
            nodelifecycle::on_pod(ctx, c);
            quota::on_counted(ctx, c);
        }),
        replica_sets: start(
            &ctx,
            client.clone(),
            all(),
            |ctx, c: &Change<ReplicaSet>| {
                replicaset::on_replica_set(ctx, c);
                deployment::on_replica_set(ctx, c);
                gc::on_dependent(ctx, c);
                gc::on_owner(ctx, c);
                quota::on_counted(ctx, c);
            },
        ),
        deployments: start(
            &ctx,
            client.clone(),
            all(),
            |ctx, c: &Change<Deployment>| {
                deployment::on_deployment(ctx, c);
                gc::on_owner(ctx, c);
                quota::on_counted(ctx, c);
            },
        ),
        nodes: start(&ctx, client.clone(), all(), |ctx, c: &Change<Node>| {
            nodelifecycle::on_node(ctx, c)
        }),
        leases: start(
            &ctx,
            client.clone(),
            Filter {
                namespace: NODE_LEASE_NAMESPACE.into(),
                ..Default::default()
            },
            |ctx, c: &Change<Lease>| nodelifecycle::on_lease(ctx, c),
        ),
        services: start(&ctx, client.clone(), all(), |ctx, c: &Change<Service>| {
            endpoints::on_service(ctx, c);
            quota::on_counted(ctx, c);
        }),
        endpoints: start(&ctx, client.clone(), all(), |ctx, c: &Change<Endpoints>| {
            endpoints::on_endpoints(ctx, c)
        }),
        namespaces: start(&ctx, client.clone(), all(), |ctx, c: &Change<Namespace>| {
            namespace::on_namespace(ctx, c)
        }),
        quotas: start(
            &ctx,
            client.clone(),
            all(),
            |ctx, c: &Change<ResourceQuota>| {
                quota::on_quota(ctx, c);
                quota::on_counted(ctx, c);
            },
        ),
        jobs: start(&ctx, client.clone(), all(), |ctx, c: &Change<Job>| {
            gc::on_owner(ctx, c);
            gc::on_dependent(ctx, c);
            quota::on_counted(ctx, c);
        }),
        cron_jobs: start(&ctx, client.clone(), all(), |ctx, c: &Change<CronJob>| {
            gc::on_owner(ctx, c);
            quota::on_counted(ctx, c);
        }),
        daemon_sets: start(&ctx, client.clone(), all(), |ctx, c: &Change<DaemonSet>| {
            gc::on_owner(ctx, c);
            quota::on_counted(ctx, c);
        }),
        disruption_budgets: start(
            &ctx,
            client.clone(),
            all(),
            |ctx, c: &Change<PodDisruptionBudget>| quota::on_counted(ctx, c),
        ),
    };
    for r in &ctx.registered {
        for kind in r.kinds() {
            assert!(
                informers.has(kind),
                "controller {} reads {kind}, which has no informer in Informers",
                r.queue().name()
            );
        }
    }
    if ctx.informers.set(informers).is_err() {
        return;
    }
    let mut stopped = stop.clone();
    let synced = ctx.informers().wait_synced();
    tokio::select! {
        _ = synced => {}
        _ = async { stopped.wait_for(|s| *s).await.map(|_| ()) } => return,
    }
    tracing::info!("controllers started");
    let live = Arc::new(Live { ctx: ctx.clone() });
    resync(&ctx, &live);

    let workers = ctx.config.workers;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.replicaset.queue.clone(),
            workers,
            move |k| {
                let c = c.clone();
                async move { replicaset::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.deployment.clone(),
            workers,
            move |k| {
                let c = c.clone();
                async move { deployment::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.gc.clone(),
            workers,
            move |k| {
                let c = c.clone();
                async move { gc::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.endpoints.clone(),
            workers,
            move |k| {
                let c = c.clone();
                async move { endpoints::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.namespace.clone(),
            1,
            move |k| {
                let c = c.clone();
                async move { namespace::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.quota.clone(),
            workers,
            move |k| {
                let c = c.clone();
                async move { quota::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        tasks.spawn(queue::run_workers(
            ctx.nodelifecycle.queue.clone(),
            workers,
            move |k| {
                let c = c.clone();
                async move { nodelifecycle::reconcile(&c, &k).await }
            },
            ctx.stats.clone(),
            stop.clone(),
        ));
    }
    {
        let c = ctx.clone();
        let stop = stop.clone();
        tasks.spawn(async move { nodelifecycle::monitor(c, stop).await });
    }
    for r in &ctx.registered {
        r.spawn(
            live.clone(),
            workers,
            ctx.stats.clone(),
            stop.clone(),
            &mut tasks,
        );
    }
    // Every so often everything is looked at again, in case a change was missed.
    let mut stop = stop;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => resync(&ctx, &live),
            _ = stop.wait_for(|s| *s) => break,
        }
        let depth = ctx.replicaset.queue.len()
            + ctx.deployment.len()
            + ctx.gc.len()
            + ctx.endpoints.len()
            + ctx.namespace.len()
            + ctx.quota.len()
            + ctx.nodelifecycle.queue.len()
            + ctx
                .registered
                .iter()
                .map(|r| r.queue().len())
                .sum::<usize>();
        ctx.stats.queue_depth.store(depth as u64, Ordering::Relaxed);
    }
    tasks.abort_all();
}

/// Queues every object each controller looks after.
fn resync(ctx: &Ctx, live: &Live) {
    for r in &ctx.registered {
        r.resync(live);
    }
    let i = ctx.informers();
    for j in i.jobs.list() {
        ctx.gc.add(gc::key(Job::KIND, &util::key_of(&j)));
    }
    for j in i.cron_jobs.list() {
        ctx.gc.add(gc::key(CronJob::KIND, &util::key_of(&j)));
    }
    for d in i.daemon_sets.list() {
        ctx.gc.add(gc::key(DaemonSet::KIND, &util::key_of(&d)));
    }
    for rs in i.replica_sets.list() {
        ctx.replicaset.queue.add(util::key_of(&rs));
        ctx.gc.add(gc::key("ReplicaSet", &util::key_of(&rs)));
    }
    for d in i.deployments.list() {
        ctx.deployment.add(util::key_of(&d));
        ctx.gc.add(gc::key("Deployment", &util::key_of(&d)));
    }
    i.pods.with_cache(|pods| {
        for (k, p) in pods {
            if p.metadata
                .as_ref()
                .is_some_and(|m| !m.owner_references.is_empty())
            {
                ctx.gc.add(gc::key("Pod", k));
            }
        }
    });
    for s in i.services.list() {
        ctx.endpoints.add(util::key_of(&s));
    }
    for n in i.namespaces.list() {
        if util::is_deleting(&n) {
            ctx.namespace.add(util::key_of(&n));
        }
    }
    for n in i.nodes.list() {
        ctx.nodelifecycle.queue.add(util::key_of(&n));
    }
    for q in i.quotas.list() {
        ctx.quota.add(util::key_of(&q));
    }
}

fn start<K: flotilla_proto::api::Resource>(
    ctx: &Arc<Ctx>,
    client: Client,
    filter: Filter,
    handler: fn(&Ctx, &Change<K>),
) -> Informer<K> {
    let ctx = ctx.clone();
    Informer::start(client, filter, move |c| {
        handler(&ctx, &c);
        ctx.subscribers.notify(&c, ctx.try_informers());
    })
}
