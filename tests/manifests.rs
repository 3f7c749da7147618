//! The install manifests (`manifests/*.yaml`) as the API server will see them:
//! every document parses into its typed k8s-openapi object with no unknown
//! field, the RBAC names every grant (what it allows is asked of a real kube-apiserver in
//! testbed/tests/control_plane_real.rs), the admission policy
//! is bound to the agent's service account, the DaemonSet has the properties
//! docs/operations.md promises, every environment variable it sets is a real
//! flag of `wgmesh`, and the Grafana dashboard uses the metric names the
//! agent exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The metric names the telemetry module exports (docs/operations.md).
const METRICS: &[&str] = &[
    "wgmesh_peers",
    "wgmesh_peer_last_handshake_seconds",
    "wgmesh_peer_receive_bytes_total",
    "wgmesh_peer_transmit_bytes_total",
    "wgmesh_key_age_seconds",
    "wgmesh_key_generation",
    "wgmesh_reconcile_duration_seconds",
    "wgmesh_rejected_nodes",
    "wgmesh_api_errors_total",
];

const METRICS_PORT: i32 = 9586;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// One YAML document: the file it came from and its content.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> String {
        let s = |k: &str| self.value.get(k).and_then(Value::as_str).unwrap_or("?");
        format!("{}/{}", s("apiVersion"), s("kind"))
    }
}

fn documents() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .expect("manifests/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests/*.yaml");
    let mut docs = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{file}: not valid YAML: {e}"));
        for value in values {
            assert!(value.is_object(), "{file}: a document is not a mapping");
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

/// Every path in `original` that did not survive the round trip through the
/// typed object: fields it does not know (dropped) and values it changed.
fn lost_fields(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &p, out),
                    None => out.push(format!("{p} (unknown field)")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match b.get(i) {
                    Some(w) => lost_fields(v, w, &p, out),
                    None => out.push(format!("{p} (dropped)")),
                }
            }
        }
        (a, b) if a == b => {}
        // The schema's numeric bounds are floats in the API types: 0 and
        // 0.0 are the same bound.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) => out.push(format!("{path} (was {a}, became {b})")),
    }
}

/// Deserializes `doc` into `T`, failing on any unknown field (k8s-openapi
/// types ignore unknown fields, so the typed object is serialized back and
/// compared with the document).
fn strict<T: DeserializeOwned + Serialize>(doc: &Doc) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.value.clone())
        .map_err(|e| format!("{}: {}: {e}", doc.file, doc.kind()))?;
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(&doc.value, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "{}: {}: fields the API would not keep:\n  {}",
            doc.file,
            doc.kind(),
            lost.join("\n  ")
        ))
    }
}

/// Every object of the install, typed.
#[derive(Default)]
struct Install {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    policies: Vec<ValidatingAdmissionPolicy>,
    policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    daemon_sets: Vec<DaemonSet>,
    config_maps: Vec<ConfigMap>,
    crds: Vec<CustomResourceDefinition>,
}

impl Install {
    fn load() -> Self {
        let mut install = Install::default();
        let mut errors = Vec::new();
        for doc in documents() {
            let r = match doc.kind().as_str() {
                "v1/Namespace" => strict(&doc).map(|o| install.namespaces.push(o)),
                "v1/ServiceAccount" => strict(&doc).map(|o| install.service_accounts.push(o)),
                "v1/ConfigMap" => strict(&doc).map(|o| install.config_maps.push(o)),
                "rbac.authorization.k8s.io/v1/ClusterRole" => {
                    strict(&doc).map(|o| install.cluster_roles.push(o))
                }
                "rbac.authorization.k8s.io/v1/ClusterRoleBinding" => {
                    strict(&doc).map(|o| install.cluster_role_bindings.push(o))
                }
                "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy" => {
                    strict(&doc).map(|o| install.policies.push(o))
                }
                "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicyBinding" => {
                    strict(&doc).map(|o| install.policy_bindings.push(o))
                }
                "apps/v1/DaemonSet" => strict(&doc).map(|o| install.daemon_sets.push(o)),
                "apiextensions.k8s.io/v1/CustomResourceDefinition" => {
                    strict(&doc).map(|o| install.crds.push(o))
                }
                other => Err(format!(
                    "{}: unexpected kind {other} (a new kind needs a check here, \
                     and RBAC kinds need the minimum-privilege review)",
                    doc.file
                )),
            };
            if let Err(e) = r {
                errors.push(e);
            }
        }
        assert!(errors.is_empty(), "\n{}", errors.join("\n"));
        install
    }

    fn one<'a, T>(list: &'a [T], what: &str) -> &'a T {
        assert_eq!(list.len(), 1, "expected exactly one {what}");
        &list[0]
    }

    fn service_account(&self) -> &ServiceAccount {
        Self::one(&self.service_accounts, "ServiceAccount")
    }

    fn daemon_set(&self) -> &DaemonSet {
        Self::one(&self.daemon_sets, "DaemonSet")
    }

    fn pod(&self) -> &PodSpec {
        self.daemon_set().spec.template.spec.as_ref().unwrap()
    }

    fn container(&self, name: &str) -> &Container {
        self.pod()
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    fn config_map(&self) -> &ConfigMap {
        Self::one(&self.config_maps, "ConfigMap")
    }

    /// `system:serviceaccount:<namespace>:<name>` of the agent.
    fn agent_username(&self) -> String {
        let sa = &self.service_account().metadata;
        format!(
            "system:serviceaccount:{}:{}",
            sa.namespace.as_deref().unwrap(),
            sa.name.as_deref().unwrap()
        )
    }
}

#[test]
fn every_manifest_is_a_typed_object_without_unknown_fields() {
    let install = Install::load();
    Install::one(&install.namespaces, "Namespace");
    install.service_account();
    Install::one(&install.cluster_roles, "ClusterRole");
    Install::one(&install.cluster_role_bindings, "ClusterRoleBinding");
    Install::one(&install.policies, "ValidatingAdmissionPolicy");
    Install::one(&install.policy_bindings, "ValidatingAdmissionPolicyBinding");
    install.daemon_set();
    install.config_map();
    Install::one(&install.crds, "CustomResourceDefinition");

    // Everything namespaced lives in the one namespace.
    let ns = install.namespaces[0].metadata.name.clone().unwrap();
    assert_eq!(ns, "wgmesh");
    for (what, got) in [
        (
            "ServiceAccount",
            &install.service_account().metadata.namespace,
        ),
        ("DaemonSet", &install.daemon_set().metadata.namespace),
        ("ConfigMap", &install.config_map().metadata.namespace),
    ] {
        assert_eq!(got.as_deref(), Some(ns.as_str()), "{what}");
    }
}

#[test]
fn unknown_and_changed_fields_are_caught_with_their_path() {
    let yaml = "\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: x
spec:
  selector: {}
  template:
    spec:
      hostNetwrk: true
      containers:
        - name: a
          imagePullPolcy: Always
";
    let value: Value = serde_saphyr::from_str(yaml).unwrap();
    let doc = Doc {
        file: "inline".into(),
        value,
    };
    let err = strict::<DaemonSet>(&doc).unwrap_err();
    assert!(
        err.contains(".spec.template.spec.hostNetwrk (unknown field)"),
        "{err}"
    );
    assert!(
        err.contains(".spec.template.spec.containers[0].imagePullPolcy (unknown field)"),
        "{err}"
    );

    // A ConfigMap value must be a string; a YAML number is a type error.
    let doc = Doc {
        file: "inline".into(),
        value: serde_saphyr::from_str(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {PORT: 51820}\n",
        )
        .unwrap(),
    };
    assert!(strict::<ConfigMap>(&doc).is_err());
}

#[test]
fn rbac_names_every_grant_and_binds_only_the_agent() {
    let install = Install::load();
    let role = Install::one(&install.cluster_roles, "ClusterRole");
    assert!(role.aggregation_rule.is_none(), "no aggregation");

    let mut triples = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        assert!(rule.resource_names.is_none(), "no resourceNames");
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    let fresh = triples.insert((group.as_str(), resource.as_str(), verb.as_str()));
                    assert!(fresh, "duplicate rule {group}/{resource}/{verb}");
                }
            }
        }
    }
    // No wildcard: every grant is named. What the grants allow and refuse is
    // asked of a real kube-apiserver (`kubectl auth can-i` and real requests
    // with an agent's bound token): testbed/tests/control_plane_real.rs.
    assert!(
        triples
            .iter()
            .all(|(g, r, v)| !g.contains('*') && !r.contains('*') && !v.contains('*')),
        "a wildcard grant: {triples:?}"
    );

    // The binding gives exactly that role to exactly the agent's account,
    // and the DaemonSet runs as that account.
    let binding = Install::one(&install.cluster_role_bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let sa = &install.service_account().metadata;
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.namespace);
    assert_eq!(install.pod().service_account_name, sa.name);
}

#[test]
fn the_admission_policy_binds_the_agent_to_its_own_nodes_wgmesh_annotations() {
    let install = Install::load();
    let policy = Install::one(&install.policies, "ValidatingAdmissionPolicy");
    let spec = policy.spec.as_ref().unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));

    // It judges exactly the agent's service account.
    let username = install.agent_username();
    let conditions = spec.match_conditions.as_deref().unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.expression.replace(' ', "")
                == format!("request.userInfo.username=='{username}'")),
        "no matchCondition selects {username}: {conditions:?}"
    );

    // It covers updates of Nodes.
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.as_deref())
        .unwrap_or_default();
    assert!(rules.iter().any(|r| {
        r.api_groups.as_deref() == Some(&[String::new()][..])
            && r.resources
                .as_ref()
                .is_some_and(|v| v.contains(&"nodes".into()))
            && r.operations
                .as_ref()
                .is_some_and(|v| v.contains(&"UPDATE".into()))
    }));

    // The rules: the node name bound into the token, the annotation prefix,
    // and labels, spec and status unchanged; each with a message.
    let validations = spec.validations.as_deref().unwrap_or_default();
    let all: String = validations
        .iter()
        .map(|v| v.expression.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "request.userInfo.extra['authentication.kubernetes.io/node-name']",
        "[request.name]",
        "k in variables.agentKeys",
        "object.metadata.labels",
        "object.spec == oldObject.spec",
        "object.status == oldObject.status",
    ] {
        assert!(all.contains(needle), "no validation uses {needle}");
    }
    assert!(validations.iter().all(|v| v.message.is_some()));

    // The keys the policy lets the agent write are exactly the ones it owns:
    // never a key people set (force-endpoint, persistent-keepalive,
    // rotate-requested). What the API server makes of it is tested on a real
    // kube-apiserver (testbed/tests/control_plane_real.rs).
    let variables = spec.variables.as_deref().unwrap_or_default();
    let agent_keys = variables
        .iter()
        .find(|v| v.name == "agentKeys")
        .expect("a variable agentKeys");
    let listed: BTreeSet<String> = agent_keys
        .expression
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|k| k.trim().trim_matches('\'').to_string())
        .collect();
    let owned: BTreeSet<String> = wgmesh::node::annotations::AGENT_OWNED
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        listed, owned,
        "agentKeys in the policy vs annotations::AGENT_OWNED"
    );

    let binding = Install::one(&install.policy_bindings, "ValidatingAdmissionPolicyBinding");
    let bspec = &binding.spec;
    assert_eq!(Some(&bspec.policy_name), policy.metadata.name.as_ref());
    assert_eq!(bspec.validation_actions, ["Deny"]);
    assert!(bspec.param_ref.is_none());
}

#[test]
fn the_daemonset_runs_agent_and_dataplane_with_net_admin_only() {
    let install = Install::load();
    let ds = install.daemon_set();
    let spec = &ds.spec;
    let pod = install.pod();

    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true));
    assert_ne!(pod.host_ipc, Some(true));
    let names: BTreeSet<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["agent", "dataplane"]));
    let (agent, dataplane) = (install.container("agent"), install.container("dataplane"));
    assert_eq!(agent.image, dataplane.image, "one image");
    assert!(agent.image.is_some());
    // The backend is explicit: `auto` could race the dataplane for the name.
    assert_eq!(
        agent.command.as_deref(),
        Some(
            &[
                "wgmesh".to_string(),
                "agent".into(),
                "--backend".into(),
                "uapi".into()
            ][..]
        )
    );
    assert_eq!(
        dataplane.command.as_deref(),
        Some(&["wgmesh".to_string(), "dataplane".into()][..])
    );

    // Fail closed before the pod's containers: the backstops init container.
    let inits = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one init container");
    let backstops = &inits[0];
    assert_eq!(backstops.image, agent.image, "one image");
    assert_eq!(
        backstops.command.as_deref(),
        Some(
            &[
                "wgmesh".to_string(),
                "agent".into(),
                "--backstops-only".into()
            ][..]
        )
    );

    // Least privilege: NET_ADMIN added, everything else dropped, no escalation.
    for c in pod.containers.iter().chain(inits) {
        let sc = c.security_context.as_ref().unwrap();
        assert_ne!(sc.privileged, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(
            caps.add.as_deref(),
            Some(&["NET_ADMIN".to_string()][..]),
            "{}",
            c.name
        );
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{}",
            c.name
        );
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        assert!(
            requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
            "{}: resource requests",
            c.name
        );
    }

    // Never two nodes down at once.
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
    assert!(pod.termination_grace_period_seconds.is_some());

    // Readiness: /readyz on the named metrics port 9586.
    let probe = agent.readiness_probe.as_ref().unwrap();
    let get = probe.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/readyz"));
    assert_eq!(get.port, IntOrString::String("metrics".into()));
    let port = agent
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(port.container_port, METRICS_PORT);

    // Runs on every node: one toleration of every taint.
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));

    // Volumes: the shared UAPI directory, the key store and /dev/net/tun.
    let volumes: BTreeMap<&str, _> = pod
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mounts = |c: &Container| -> BTreeMap<String, String> {
        c.volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|m| (m.mount_path.clone(), m.name.clone()))
            .collect()
    };
    let (am, dm) = (mounts(agent), mounts(dataplane));

    let uapi = &am["/var/run/wireguard"];
    assert_eq!(&dm["/var/run/wireguard"], uapi, "one socket directory");
    let v = volumes[uapi.as_str()];
    assert!(v.empty_dir.is_some() || v.host_path.is_some());

    let keys = volumes[am["/var/lib/wgmesh"].as_str()]
        .host_path
        .as_ref()
        .expect("key store on the host");
    assert_eq!(keys.path, "/var/lib/wgmesh");
    assert_eq!(keys.type_.as_deref(), Some("DirectoryOrCreate"));
    assert!(!dm.contains_key("/var/lib/wgmesh"), "keys: agent only");

    let cni = volumes[am["/etc/cni/net.d"].as_str()]
        .host_path
        .as_ref()
        .expect("the agent writes the CNI config to a hostPath");
    assert_eq!(cni.path, "/etc/cni/net.d");
    let tun = volumes[dm["/dev/net/tun"].as_str()]
        .host_path
        .as_ref()
        .expect("/dev/net/tun from the host");
    assert_eq!(tun.path, "/dev/net/tun");
    assert_eq!(tun.type_.as_deref(), Some("CharDevice"));

    // The API token reaches the agent only.
    const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(am.contains_key(TOKEN_DIR));
    assert!(!dm.contains_key(TOKEN_DIR));
    let token = volumes[am[TOKEN_DIR].as_str()].projected.as_ref().unwrap();
    assert!(token
        .sources
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|s| s.service_account_token.is_some()));

    // NODE_NAME from the Downward API; settings from the ConfigMap.
    let node_name = agent
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    let cm_name = install.config_map().metadata.name.clone().unwrap();
    for c in [agent, dataplane] {
        let from = c.env_from.as_deref().unwrap_or_default();
        assert!(
            from.iter()
                .any(|f| f.config_map_ref.as_ref().map(|r| &r.name) == Some(&cm_name)),
            "{}: envFrom the ConfigMap",
            c.name
        );
    }
    let data = install.config_map().data.clone().unwrap_or_default();
    assert!(data.contains_key("WGMESH_CLUSTER_CIDRS"));
}

/// The help text of `wgmesh <sub> --help`.
fn help(sub: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .args([sub, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "wgmesh {sub} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `help` documents the environment variable `name` (clap prints
/// `[env: NAME=value]`; the line may wrap after `env:`).
fn documents_env(help: &str, name: &str) -> bool {
    let needle = format!("{name}=");
    help.match_indices(&needle).any(|(i, _)| {
        help[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    })
}

#[test]
fn every_environment_variable_set_is_a_flag_of_wgmesh() {
    let install = Install::load();
    let (agent_help, dataplane_help) = (help("agent"), help("dataplane"));
    assert!(documents_env(&agent_help, "WGMESH_CLUSTER_CIDRS"));
    assert!(!documents_env(&agent_help, "CLUSTER_CIDRS"));

    let mut unknown = Vec::new();
    for (container, text) in [("agent", &agent_help), ("dataplane", &dataplane_help)] {
        for env in install
            .container(container)
            .env
            .as_deref()
            .unwrap_or_default()
        {
            if !documents_env(text, &env.name) {
                unknown.push(format!("{container}: env {}", env.name));
            }
        }
    }
    // Both containers read the whole ConfigMap: each key is a flag of one.
    for key in install.config_map().data.clone().unwrap_or_default().keys() {
        if !documents_env(&agent_help, key) && !documents_env(&dataplane_help, key) {
            unknown.push(format!("ConfigMap key {key}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "not in `wgmesh agent --help` / `wgmesh dataplane --help`: {unknown:?}"
    );
}

#[test]
fn the_dashboard_uses_exactly_the_exported_metric_names() {
    let path = manifests_dir().join("grafana/wgmesh-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!((6..=10).contains(&panels.len()), "about 8 panels");

    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("wgmesh_"))
                .collect();
            assert!(!names.is_empty(), "{title}: {expr}");
            for name in names {
                // A histogram is queried through its series.
                let base = name.strip_suffix("_bucket").unwrap_or(name);
                assert!(METRICS.contains(&base), "{title}: unknown metric {name}");
                used.insert(base);
            }
        }
    }
    let unused: Vec<_> = METRICS.iter().filter(|m| !used.contains(*m)).collect();
    assert!(unused.is_empty(), "metrics on no panel: {unused:?}");
}

/// `manifests/kernel/04-daemonset.yaml`, the kernel-mode variant, installed
/// instead of `04-daemonset.yaml`: the same DaemonSet (name, namespace,
/// selector, rollout, init container, security, probes, token, key store,
/// CNI) with the agent alone and its backend fixed to `kernel`: no dataplane
/// container, no /dev/net/tun, no UAPI socket directory. Checked as the
/// userspace one turned into it, so the two cannot drift apart.
#[test]
fn the_kernel_daemonset_is_the_agent_alone_with_the_backend_fixed() {
    let file = "kernel/04-daemonset.yaml";
    let text = std::fs::read_to_string(manifests_dir().join(file)).unwrap();
    let values: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{file}: not valid YAML: {e}"));
    assert_eq!(values.len(), 1, "{file}: one document");
    let doc = Doc {
        file: file.into(),
        value: values.into_iter().next().unwrap(),
    };
    assert_eq!(doc.kind(), "apps/v1/DaemonSet");
    let kernel: DaemonSet = strict(&doc).unwrap_or_else(|e| panic!("{e}"));

    let pod = kernel.spec.template.spec.as_ref().unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["agent"], "the agent alone");
    let agent = &pod.containers[0];
    assert_eq!(
        agent.command.as_deref(),
        Some(
            &[
                "wgmesh".to_string(),
                "agent".into(),
                "--backend".into(),
                "kernel".into()
            ][..]
        ),
        "the backend fixed, not probed"
    );
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    assert!(
        !volumes.iter().any(|v| v
            .host_path
            .as_ref()
            .is_some_and(|h| h.path == "/dev/net/tun")),
        "no /dev/net/tun"
    );
    assert!(
        !agent
            .volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|m| m.mount_path == "/var/run/wireguard"),
        "no UAPI socket directory"
    );

    // Everything else is the userspace DaemonSet's.
    let install = Install::load();
    let mut want = serde_json::to_value(install.daemon_set()).unwrap();
    let spec = &mut want["spec"]["template"]["spec"];
    let containers = spec["containers"].as_array_mut().unwrap();
    containers.retain(|c| c["name"] != "dataplane");
    let dataplane_port = serde_json::to_value(
        install
            .container("dataplane")
            .ports
            .as_deref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some("wireguard"))
            .expect("the dataplane's wireguard port"),
    )
    .unwrap();
    let agent = &mut containers[0];
    agent["command"] = serde_json::json!(["wgmesh", "agent", "--backend", "kernel"]);
    // The kernel's UDP socket takes the port the dataplane reserved.
    agent["ports"]
        .as_array_mut()
        .unwrap()
        .insert(0, dataplane_port);
    agent["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["mountPath"] != "/var/run/wireguard");
    spec["volumes"]
        .as_array_mut()
        .unwrap()
        .retain(|v| v["name"] != "uapi" && v["name"] != "tun");
    let got = serde_json::to_value(&kernel).unwrap();
    let mut differences = Vec::new();
    lost_fields(&want, &got, "", &mut differences);
    lost_fields(&got, &want, "", &mut differences);
    assert!(
        differences.is_empty(),
        "{file} differs from 04-daemonset.yaml beyond the kernel-mode changes:\n  {}",
        differences.join("\n  ")
    );
}

#[test]
fn the_meshroute_crd_is_what_the_agent_watches_and_agents_only_read_it() {
    use wgmesh::routes::grant;
    let install = Install::load();
    let crd = Install::one(&install.crds, "CustomResourceDefinition");
    assert_eq!(crd.spec.group, grant::GROUP);
    assert_eq!(crd.spec.names.kind, grant::KIND);
    assert_eq!(crd.spec.names.plural, grant::PLURAL);
    assert_eq!(crd.spec.scope, "Cluster", "admin-owned, not per namespace");
    let versions: Vec<_> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(versions, [grant::VERSION]);
    let role = Install::one(&install.cluster_roles, "ClusterRole");
    let rules: Vec<_> = role
        .rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|r| {
            r.api_groups
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|g| g == grant::GROUP)
        })
        .collect();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&[grant::PLURAL.to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
}
