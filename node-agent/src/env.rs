//! A container's environment as the kubelet makes it: `envFrom` (every key of a ConfigMap
//! or Secret, after a prefix; values that are not UTF-8 are taken lossily), then `env` in
//! order, each `value` with `$(VAR)` expanded
//! against the variables before it (`$$` escapes) or `valueFrom` one source: a field of the
//! pod, a container's resource, a key of a ConfigMap or Secret. A later variable of a name
//! replaces an earlier one. What a container needs and cannot have (a ConfigMap, Secret or
//! key that does not exist, unless `optional`) keeps it from starting, with Kubernetes'
//! reason `CreateContainerConfigError` and a message naming what is missing.

use std::collections::BTreeMap;

use flotilla_client::{Client, ClientError};
use flotilla_proto::api::quantity::Quantity;
use flotilla_proto::api::{ConfigMap, Container, Node, Pod, Resource, Secret};

/// What the environment is resolved against besides the pod itself.
pub struct Context<'a> {
    pub client: &'a Client,
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub node_name: &'a str,
    pub host_ip: &'a str,
}

/// The variables, in order, each name once (a later definition replaces an earlier one
/// where it stood).
#[derive(Default)]
struct Vars(Vec<(String, String)>);

impl Vars {
    fn set(&mut self, name: String, value: String) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The ConfigMaps and Secrets read for one container, each once.
#[derive(Default)]
struct Fetched {
    config_maps: BTreeMap<String, Option<ConfigMap>>,
    secrets: BTreeMap<String, Option<Secret>>,
}

/// Reads `name` of kind `K` in the pod's namespace; `None` when it does not exist.
pub(crate) async fn fetch<K: Resource>(cx: &Context<'_>, name: &str) -> Result<Option<K>, String> {
    match cx.client.get::<K>(cx.pod.namespace(), name).await {
        Ok(o) => Ok(Some(o)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(unreadable::<K>(name, &e)),
    }
}

fn unreadable<K: Resource>(name: &str, e: &ClientError) -> String {
    format!(
        "reading {} {name:?}: {}",
        K::KIND.to_ascii_lowercase(),
        e.status.message()
    )
}

impl Fetched {
    async fn config_map(
        &mut self,
        cx: &Context<'_>,
        name: &str,
    ) -> Result<Option<&ConfigMap>, String> {
        if !self.config_maps.contains_key(name) {
            let o = fetch::<ConfigMap>(cx, name).await?;
            self.config_maps.insert(name.to_string(), o);
        }
        Ok(self.config_maps.get(name).and_then(Option::as_ref))
    }
    async fn secret(&mut self, cx: &Context<'_>, name: &str) -> Result<Option<&Secret>, String> {
        if !self.secrets.contains_key(name) {
            let o = fetch::<Secret>(cx, name).await?;
            self.secrets.insert(name.to_string(), o);
        }
        Ok(self.secrets.get(name).and_then(Option::as_ref))
    }
}

/// The environment of container `c` of the pod, after `base` (the variables the agent
/// always sets); `Err` is the message of a `CreateContainerConfigError`.
pub async fn resolve(
    cx: &Context<'_>,
    c: &Container,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, String> {
    let ns = cx.pod.namespace();
    let mut vars = Vars(Vec::new());
    for (n, v) in base {
        vars.set(n, v);
    }
    let mut fetched = Fetched::default();
    for from in &c.env_from {
        if let Some(r) = &from.config_map_ref {
            match fetched.config_map(cx, &r.name).await? {
                Some(cm) => {
                    for (k, v) in &cm.data {
                        vars.set(format!("{}{k}", from.prefix), v.clone());
                    }
                    for (k, v) in &cm.binary_data {
                        vars.set(
                            format!("{}{k}", from.prefix),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        }
        if let Some(r) = &from.secret_ref {
            match fetched.secret(cx, &r.name).await? {
                Some(s) => {
                    for (k, v) in &s.data {
                        vars.set(
                            format!("{}{k}", from.prefix),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        }
    }
    for e in &c.env {
        let Some(from) = &e.value_from else {
            let value = expand(&e.value, &vars);
            vars.set(e.name.clone(), value);
            continue;
        };
        let value = if let Some(f) = &from.field_ref {
            Some(field(cx, &f.field_path)?)
        } else if let Some(r) = &from.config_map_key_ref {
            let optional = r.optional == Some(true);
            match fetched.config_map(cx, &r.name).await? {
                None if optional => None,
                None => return Err(format!("configmap \"{}\" not found", r.name)),
                Some(cm) => match cm.data.get(&r.key) {
                    Some(v) => Some(v.clone()),
                    None => match cm.binary_data.get(&r.key) {
                        Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                        None if optional => None,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                },
            }
        } else if let Some(r) = &from.secret_key_ref {
            let optional = r.optional == Some(true);
            match fetched.secret(cx, &r.name).await? {
                None if optional => None,
                None => return Err(format!("secret \"{}\" not found", r.name)),
                Some(s) => match s.data.get(&r.key) {
                    Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                    None if optional => None,
                    None => {
                        return Err(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        ));
                    }
                },
            }
        } else if let Some(r) = &from.resource_field_ref {
            Some(resource(cx, c, r).await?)
        } else {
            None
        };
        if let Some(v) = value {
            vars.set(e.name.clone(), v);
        }
    }
    Ok(vars.0)
}

/// `values` (a command, its arguments) with `$(NAME)` replaced from `env` (see [`expand`]).
pub fn expand_all(values: &[String], env: &[(String, String)]) -> Vec<String> {
    let vars = Vars(env.to_vec());
    values.iter().map(|v| expand(v, &vars)).collect()
}

/// `$(NAME)` replaced by the value of a variable defined before; an unknown one is left as
/// written; `$$` is a `$`.
fn expand(value: &str, vars: &Vars) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A field of the pod (`fieldRef.fieldPath`).
pub(crate) fn field(cx: &Context<'_>, path: &str) -> Result<String, String> {
    let meta = cx.pod.metadata.clone().unwrap_or_default();
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("']"))
            .map(str::to_string)
    };
    if let Some(k) = keyed("metadata.labels['") {
        return Ok(meta.labels.get(&k).cloned().unwrap_or_default());
    }
    if let Some(k) = keyed("metadata.annotations['") {
        return Ok(meta.annotations.get(&k).cloned().unwrap_or_default());
    }
    Ok(match path {
        "metadata.name" => meta.name,
        "metadata.namespace" => meta.namespace,
        "metadata.uid" => meta.uid,
        "spec.nodeName" => cx.node_name.to_string(),
        "status.podIP" | "status.podIPs" => cx.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => cx.host_ip.to_string(),
        other => return Err(format!("unsupported fieldPath {other:?}")),
    })
}

/// A container's resource (`resourceFieldRef`) in units of its divisor, rounded up; a limit
/// left unset is the node's allocatable amount, as the kubelet has it.
pub(crate) async fn resource(
    cx: &Context<'_>,
    c: &Container,
    r: &flotilla_proto::api::ResourceFieldSelector,
) -> Result<String, String> {
    let target = if r.container_name.is_empty() {
        c.clone()
    } else {
        let spec = cx.pod.spec.clone().unwrap_or_default();
        spec.containers
            .iter()
            .chain(&spec.init_containers)
            .find(|x| x.name == r.container_name)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "resourceFieldRef: no container named {:?}",
                    r.container_name
                )
            })?
    };
    let (side, name) = r
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {:?}", r.resource))?;
    let res = target.resources.clone().unwrap_or_default();
    let set = match side {
        "limits" => res.limits.get(name).cloned(),
        "requests" => res.requests.get(name).or(res.limits.get(name)).cloned(),
        _ => return Err(format!("unsupported resource {:?}", r.resource)),
    };
    let amount = match set {
        Some(q) => q,
        None if side == "requests" => "0".to_string(),
        None => {
            let node = cx
                .client
                .get::<Node>("", cx.node_name)
                .await
                .map_err(|e| unreadable::<Node>(cx.node_name, &e))?;
            node.status
                .and_then(|s| s.allocatable.get(name).cloned())
                .ok_or_else(|| format!("node {} has no allocatable {name}", cx.node_name))?
        }
    };
    let bad = |what: &str, v: &str| format!("resourceFieldRef: {what} {v:?} is not a quantity");
    let amount = Quantity::parse(&amount).map_err(|_| bad("amount", &amount))?;
    let divisor = if r.divisor.is_empty() {
        "1"
    } else {
        &r.divisor
    };
    let divisor = Quantity::parse(divisor).map_err(|_| bad("divisor", divisor))?;
    let d = divisor.millis().max(1);
    let units = amount.millis() / d + i128::from(amount.millis() % d != 0);
    Ok(units.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_against_earlier_variables_and_dollars_escape() {
        let vars = Vars(vec![
            ("HOST".into(), "db".into()),
            ("PORT".into(), "5432".into()),
        ]);
        assert_eq!(expand("$(HOST):$(PORT)", &vars), "db:5432");
        assert_eq!(
            expand("$$(HOST) $(NOPE) $ $(", &vars),
            "$(HOST) $(NOPE) $ $("
        );
        assert_eq!(expand("cost: 5$", &vars), "cost: 5$");
    }

    #[test]
    fn a_reference_to_a_later_variable_or_to_itself_stays_as_written() {
        // As Kubernetes: only variables defined before expand.
        let mut vars = Vars::default();
        vars.set("A".into(), expand("$(B)", &vars));
        vars.set("B".into(), "x".into());
        vars.set("PATH".into(), expand("/opt/bin:$(PATH)", &vars));
        assert_eq!(vars.get("A"), Some("$(B)"));
        assert_eq!(vars.get("PATH"), Some("/opt/bin:$(PATH)"));
        let env = vec![("PASSWORD".to_string(), "s3cr3t".to_string())];
        assert_eq!(
            expand_all(&["--password=$(PASSWORD)".to_string()], &env),
            ["--password=s3cr3t"]
        );
    }

    #[test]
    fn a_later_definition_replaces_an_earlier_one_in_place() {
        let mut vars = Vars::default();
        vars.set("A".into(), "1".into());
        vars.set("B".into(), "2".into());
        vars.set("A".into(), "3".into());
        assert_eq!(
            vars.0,
            vec![("A".to_string(), "3".to_string()), ("B".into(), "2".into())]
        );
    }
}
