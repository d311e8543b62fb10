//! The endpoints controller: for each Service with a selector, an Endpoints object of the
//! same name listing the matching pods' addresses (ready ones under `addresses`, the others
//! under `notReadyAddresses`) and the ports their containers serve the service's ports on.

use std::collections::BTreeMap;

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectMeta, ObjectReference, Pod,
    Resource, Service,
};

use crate::Ctx;
use crate::queue::Requeue;
use crate::util::{is_active, is_ready, key_of, labels_of, split_key};

pub fn on_service(ctx: &Ctx, change: &Change<Service>) {
    match change {
        Change::Added(s) | Change::Updated { new: s, .. } | Change::Deleted(s) => {
            ctx.endpoints.add(key_of(s))
        }
    }
}

pub fn on_endpoints(ctx: &Ctx, change: &Change<Endpoints>) {
    // Someone else changed or removed what we manage: put it back.
    if let Change::Updated { new: e, .. } | Change::Deleted(e) = change {
        ctx.endpoints.add(key_of(e));
    }
}

fn selects(s: &Service, labels: &BTreeMap<String, String>) -> bool {
    let sel = s.spec.as_ref().map(|s| &s.selector);
    sel.is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

pub fn on_pod(ctx: &Ctx, change: &Change<Pod>) {
    let Some(i) = ctx.try_informers() else {
        return;
    };
    let (old, new) = match change {
        Change::Added(p) | Change::Deleted(p) => (None, p),
        Change::Updated { old, new } => (Some(old), new),
    };
    let new_labels = labels_of(new);
    let old_labels = old.map(labels_of);
    for s in i.services.list_namespace(new.namespace(), |s| {
        selects(s, &new_labels) || old_labels.as_ref().is_some_and(|l| selects(s, l))
    }) {
        ctx.endpoints.add(key_of(&s));
    }
}

/// The port a pod serves a service port on: `targetPort` as a number, or the container
/// port of that name, or the service port itself.
fn target_port(pod: &Pod, target: &str, port: i32) -> Option<i32> {
    if target.is_empty() {
        return Some(port);
    }
    if let Ok(n) = target.parse::<i32>() {
        return Some(n);
    }
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter())
        .find(|p| p.name == target)
        .map(|p| p.container_port)
}

/// The subsets for a service: pods grouped by the ports they resolve to.
pub fn subsets(service: &Service, pods: &[Pod]) -> Vec<EndpointSubset> {
    let spec = service.spec.clone().unwrap_or_default();
    // Resolved (name, port, protocol) → (ready, not ready) addresses.
    type Ports = Vec<(String, i32, String)>;
    type Addresses = (Vec<EndpointAddress>, Vec<EndpointAddress>);
    let mut groups: BTreeMap<Ports, Addresses> = BTreeMap::new();
    for p in pods {
        let status = p.status.clone().unwrap_or_default();
        if status.pod_ip.is_empty() || !is_active(p) {
            continue;
        }
        let ports: Vec<(String, i32, String)> = spec
            .ports
            .iter()
            .filter_map(|sp| {
                let protocol = if sp.protocol.is_empty() {
                    "TCP".to_string()
                } else {
                    sp.protocol.clone()
                };
                target_port(p, &sp.target_port, sp.port).map(|n| (sp.name.clone(), n, protocol))
            })
            .collect();
        let address = EndpointAddress {
            ip: status.pod_ip.clone(),
            node_name: p
                .spec
                .as_ref()
                .map(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            target_ref: Some(ObjectReference {
                kind: "Pod".into(),
                namespace: p.namespace().to_string(),
                name: p.name().to_string(),
                uid: p
                    .metadata
                    .as_ref()
                    .map(|m| m.uid.clone())
                    .unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let group = groups.entry(ports).or_default();
        if is_ready(p) {
            group.0.push(address);
        } else {
            group.1.push(address);
        }
    }
    groups
        .into_iter()
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            not_ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            EndpointSubset {
                addresses: ready,
                not_ready_addresses: not_ready,
                ports: ports
                    .into_iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name,
                        port,
                        protocol,
                    })
                    .collect(),
            }
        })
        .collect()
}

pub async fn reconcile(ctx: &Ctx, key: &str) -> Result<Requeue, ClientError> {
    let (ns, name) = split_key(key);
    let i = ctx.informers();
    let Some(service) = i.services.get(ns, name) else {
        if i.endpoints.get(ns, name).is_some() {
            match ctx.client.delete_named::<Endpoints>(ns, name).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(None);
    };
    if service.spec.as_ref().is_none_or(|s| s.selector.is_empty()) {
        // Without a selector the endpoints are the user's to write.
        return Ok(None);
    }
    let pods = i
        .pods
        .list_namespace(ns, |p| selects(&service, &labels_of(p)));
    let subsets = subsets(&service, &pods);
    match i.endpoints.get(ns, name) {
        Some(current) if current.subsets == subsets => {}
        Some(mut current) => {
            current.subsets = subsets;
            ctx.client.update(&current).await?;
        }
        None => {
            let e = Endpoints {
                metadata: Some(ObjectMeta {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    labels: service
                        .metadata
                        .as_ref()
                        .map(|m| m.labels.clone())
                        .unwrap_or_default(),
                    ..Default::default()
                }),
                subsets,
                ..Default::default()
            };
            // Already there but not yet in the cache: the error queues another look.
            ctx.client.create(&e).await?;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::api::json::from_value;
    use serde_json::json;

    fn pod(name: &str, ip: &str, ready: bool) -> Pod {
        from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .unwrap()
    }

    fn service(target: serde_json::Value) -> Service {
        from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": target}]},
        }))
        .unwrap()
    }

    #[test]
    fn ready_and_not_ready_addresses_with_named_ports() {
        let pods = [
            pod("b", "10.0.0.2", true),
            pod("a", "10.0.0.1", true),
            pod("c", "10.0.0.3", false),
            pod("no-ip", "", true),
        ];
        let s = subsets(&service(json!("http")), &pods);
        assert_eq!(s.len(), 1);
        let ips = |a: &[EndpointAddress]| a.iter().map(|a| a.ip.clone()).collect::<Vec<_>>();
        assert_eq!(ips(&s[0].addresses), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(ips(&s[0].not_ready_addresses), ["10.0.0.3"]);
        assert_eq!(s[0].ports[0].port, 8080);
        assert_eq!(s[0].ports[0].protocol, "TCP");
        // A number is taken as is; none means the service port.
        assert_eq!(subsets(&service(json!(9000)), &pods)[0].ports[0].port, 9000);
        let s: Service = from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
        }))
        .unwrap();
        assert_eq!(subsets(&s, &pods)[0].ports[0].port, 80);
    }
}
