//! `kubectl cplink` against the whole product: a real control plane, three real nodes
//! (kubelet and containerd, cplink running from its image), the chart's operator rolling out a
//! link with two servers, kube-apiserver wired through it. The real `kubectl` runs the plugin
//! from the PATH, as a user's would; the plugin reads the servers' and agents' debug views
//! through kube-apiserver's pod proxy, and so through the tunnel, as in any cluster. The test
//! reads what it prints for a healthy link, an unknown node, an agent crash-looping and a
//! server missing.

use std::process::Command;
use std::time::Duration;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::stack::{
    Egress, Follow, LINK, NAMESPACE, OPERATOR_REPLICAS, STEP, Stack, StackOptions,
};
use cplink_e2e::{binaries, wait};

/// How long the test may take.
const DEADLINE: Duration = Duration::from_secs(480);

/// What one run of the plugin did.
#[derive(Debug)]
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

/// `kubectl cplink -n NAMESPACE ARGS`, the plugin found on the PATH.
fn cplink(stack: &Stack, args: &[&str]) -> anyhow::Result<Run> {
    let path = format!(
        "{}:{}",
        binaries::bin_dir()?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .env("KUBECONFIG", &stack.plane.kubeconfig)
        .env("PATH", path)
        .args(["cplink", "-n", NAMESPACE])
        .args(args)
        .output()?;
    let run = Run {
        success: out.status.success(),
        stdout: String::from_utf8(out.stdout)?,
        stderr: String::from_utf8(out.stderr)?,
    };
    eprintln!(
        "$ kubectl cplink {}\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    Ok(run)
}

/// The plugin's output; fails unless it exited 0.
fn cplink_ok(stack: &Stack, args: &[&str]) -> anyhow::Result<String> {
    let run = cplink(stack, args)?;
    anyhow::ensure!(
        run.success,
        "kubectl cplink {}: {}",
        args.join(" "),
        run.stderr
    );
    Ok(run.stdout)
}

/// The rows of the table starting with `header`'s first column, as cells.
fn rows(text: &str, first_column: &str) -> Vec<Vec<String>> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{first_column} ")));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let starts: Vec<usize> = header
        .split_whitespace()
        .scan(0, |from, name| {
            let at = header[*from..].find(name).map(|i| i + *from)?;
            *from = at + name.len();
            Some(at)
        })
        .collect();
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|line| {
            starts
                .iter()
                .enumerate()
                .map(|(i, start)| {
                    let end = starts.get(i + 1).copied().unwrap_or(line.len());
                    line.get(*start..end.min(line.len()))
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .collect()
        })
        .collect()
}

#[test]
fn kubectl_cplink_reports_a_healthy_link_an_unknown_node_a_killed_agent_and_a_missing_server()
-> anyhow::Result<()> {
    harness::run("kubectl_cplink", DEADLINE, scenario)
}

async fn scenario(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane, three real nodes, the forwarder and the operator");
    let mut stack = Stack::start(
        StackOptions {
            nodes: 3,
            servers: 2,
        },
        Egress::HttpConnect,
    )
    .await?;
    steps.enter("rolling out a link with two servers");
    stack.apply_link()?;
    stack.wait_link_ready().await?;
    steps.enter("restarting kube-apiserver with the egress configuration");
    stack.wire_egress().await?;
    // (name, IP, an address in its pod range)
    let nodes: Vec<(String, String, String)> = stack
        .nodes
        .nodes()
        .iter()
        .map(|n| {
            let in_pod_range = n.pod_cidr().replace(".0/24", ".9");
            (n.name().to_owned(), n.ip().to_string(), in_pod_range)
        })
        .collect();
    let mut servers: Vec<String> = stack.pods("server")?.into_iter().map(|p| p.0).collect();
    servers.sort();
    let agents = stack.pods("agent")?;

    // 1. A healthy link: every replica ready, every agent linked to every server.
    steps.enter("status of a healthy link");
    let status = cplink_ok(&stack, &["status"])?;
    assert!(
        status.starts_with(&format!("Link:          {NAMESPACE}/{LINK}\n")),
        "{status}"
    );
    assert!(status.contains("\nReady:         True ("), "{status}");
    assert!(
        status.contains("\nEgress:        HTTPConnect to "),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            ", configuration in Secret {LINK}-apiserver-egress\n"
        )),
        "{status}"
    );
    assert!(
        status.contains("\nCertificates:  earliest edge-"),
        "{status}"
    );
    assert!(status.contains("\nServers:       2/2 ready\n"), "{status}");
    assert!(status.contains("\nAgents:        3/3 ready\n"), "{status}");
    let server_rows = rows(&status, "SERVER");
    assert_eq!(server_rows.len(), 2, "{status}");
    for row in &server_rows {
        assert_eq!(row[2..5], ["True", "3/3", "0"], "{status}");
    }
    let agent_rows = rows(&status, "AGENT");
    assert_eq!(agent_rows.len(), 3, "{status}");
    for row in &agent_rows {
        assert_eq!(row[2..4], ["True", "2/2"], "{status}");
    }
    assert!(!status.contains("not linked"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&cplink_ok(&stack, &["status", "-o", "json"])?)?;
    let link = &json["links"][0];
    assert_eq!(link["notLinked"], serde_json::json!([]));
    assert_eq!(
        link["serverPods"][0]["linkedAgents"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    let wide = cplink_ok(&stack, &["status", "-o", "wide"])?;
    let server_ips: Vec<(String, String)> = stack
        .pods("server")?
        .into_iter()
        .map(|(pod, _, ip)| (pod, ip))
        .collect();
    for row in rows(&wide, "SERVER") {
        assert_eq!(row.len(), 7, "wide adds the IP: {wide}");
        assert!(
            server_ips.contains(&(row[0].clone(), row[2].clone())),
            "{wide}"
        );
    }
    let yaml = cplink_ok(&stack, &["status", "-o", "yaml"])?;
    assert!(yaml.contains("link: edge\n"), "{yaml}");

    let (node_2, node_2_ip, _) = &nodes[1];
    let routes = cplink_ok(&stack, &["routes", node_2])?;
    let route_rows = rows(&routes, "SERVER");
    assert_eq!(
        route_rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
        servers,
        "{routes}"
    );
    for row in &route_rows {
        assert_eq!(
            row[1..5],
            [node_2.as_str(), node_2.as_str(), "node", "<none>"],
            "{routes}"
        );
    }
    for row in rows(&cplink_ok(&stack, &["routes", node_2_ip])?, "SERVER") {
        assert_eq!(row[1..4], [node_2.as_str(), node_2.as_str(), "node"]);
    }
    let (node_3, _, in_node_3_pods) = &nodes[2];
    for row in rows(&cplink_ok(&stack, &["routes", in_node_3_pods])?, "SERVER") {
        assert_eq!(
            row[1..4],
            [node_3.as_str(), node_3.as_str(), "cidr"],
            "{in_node_3_pods}"
        );
    }

    // A log followed through the tunnel is a connection open to node-1's kubelet.
    let (node_1, node_1_ip, _) = &nodes[0];
    let (agent_1, _, _) = agents
        .iter()
        .find(|(_, node, _)| node == node_1)
        .ok_or_else(|| anyhow::anyhow!("no agent on {node_1}: {agents:?}"))?;
    let follow = Follow::start(&stack, &["logs", "-f", "-n", NAMESPACE, agent_1])?;
    let kubelet = format!("{node_1_ip}:10250");
    let mut connections = String::new();
    wait::until("the followed log among the connections", STEP, || {
        connections = cplink_ok(&stack, &["connections", "--node", node_1]).unwrap_or_default();
        rows(&connections, "SERVER")
            .iter()
            .any(|r| r[2] == kubelet && r[3] == *node_1 && r[4] == "established")
    })
    .await
    .map_err(|e| e.context(connections.clone()))?;
    assert!(
        rows(&connections, "SERVER").iter().all(|r| r[3] == *node_1),
        "--node keeps only node-1's agent's connections: {connections}"
    );
    drop(follow);

    let check = cplink(&stack, &["check", node_1])?;
    assert!(check.success, "{check:?}");
    let check_rows = rows(&check.stdout, "SERVER");
    assert_eq!(check_rows.len(), 2, "{check:?}");
    for row in &check_rows {
        assert_eq!(
            row[1..4],
            [kubelet.as_str(), node_1.as_str(), "ok"],
            "{check:?}"
        );
    }

    // 2. A node nobody knows: `any` picks some agent; the check cannot find the Node.
    steps.enter("an unknown node");
    for row in rows(&cplink_ok(&stack, &["routes", "node-x"])?, "SERVER") {
        assert_eq!(row[3], "any", "{row:?}");
        assert!(nodes.iter().any(|(n, _, _)| *n == row[1]), "{row:?}");
    }
    let unknown = cplink(&stack, &["check", "node-x"])?;
    assert!(
        !unknown.success,
        "a failed check exits non-zero: {unknown:?}"
    );
    for row in rows(&unknown.stdout, "SERVER") {
        assert_eq!(row[3], "failed", "{unknown:?}");
        assert_eq!(
            row[5], "destination unreachable: node node-x not found",
            "{unknown:?}"
        );
    }

    // 3. An agent crash-looping: node-2's agent is killed at every start.
    steps.enter("an agent crash-looping");
    let (agent_2, _, _) = agents
        .iter()
        .find(|(_, node, _)| node == node_2)
        .ok_or_else(|| anyhow::anyhow!("no agent on {node_2}: {agents:?}"))?
        .clone();
    let crash_loop = stack.nodes.crash_loop(node_2, NAMESPACE, &agent_2)?;
    let expected: Vec<String> = servers
        .iter()
        .map(|s| format!("agent {node_2} (pod {agent_2}) not linked to server {s}"))
        .collect();
    let mut killed = String::new();
    wait::until("the killed agent reported", STEP, || {
        killed = cplink_ok(&stack, &["status"]).unwrap_or_default();
        expected.iter().all(|line| killed.contains(line))
            && rows(&killed, "AGENT")
                .iter()
                .any(|r| r[0] == agent_2 && r[2] == "False" && r[5].starts_with("CrashLoopBackOff"))
    })
    .await
    .map_err(|e| e.context(killed.clone()))?;
    let row = rows(&killed, "AGENT")
        .into_iter()
        .find(|r| r[0] == agent_2)
        .unwrap_or_default();
    assert_eq!(row[1..4], [node_2.as_str(), "False", "0/2"], "{killed}");
    assert!(row[5].starts_with("CrashLoopBackOff"), "{killed}");
    for row in rows(&killed, "SERVER") {
        assert_eq!(row[3], "2/3", "{killed}");
    }
    // Dials for node-2 now go to another agent, which reaches node-2's kubelet itself.
    for row in rows(&cplink_ok(&stack, &["routes", node_2])?, "SERVER") {
        assert_eq!(row[3], "any", "{row:?}");
        assert_ne!(row[1], *node_2);
    }
    anyhow::ensure!(
        crash_loop.kills() > 0,
        "the agent on {node_2} was never killed"
    );
    // Let it run again, without waiting out kubelet's back-off: its DaemonSet replaces it.
    let kills = crash_loop.kills();
    drop(crash_loop);
    stack
        .plane
        .kubectl_ok(&["delete", "pod", "-n", NAMESPACE, &agent_2, "--wait=false"])?;
    stack.wait_link_ready().await?;
    // The old pod gone and its replacement linked: every agent row ready and linked to both
    // servers (the old one still counts against the quota below while it terminates).
    let mut relinked = String::new();
    wait::until("the agent replaced and linked again", STEP, || {
        relinked = cplink_ok(&stack, &["status"]).unwrap_or_default();
        let agents = rows(&relinked, "AGENT");
        agents.len() == 3 && agents.iter().all(|r| r[2] == "True" && r[3] == "2/2")
    })
    .await
    .map_err(|e| e.context(relinked.clone()))?;

    // 4. A server missing: a third replica asked for, which the namespace's pod quota refuses.
    steps.enter("a server missing");
    // Room for exactly the pods running now: the operator's replicas, two servers and three
    // agents. A third server is then refused.
    let running = (OPERATOR_REPLICAS + 2 + 3).to_string();
    stack.apply(
        "quota",
        &format!(
            "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: pods\n  namespace: {NAMESPACE}\n\
             spec:\n  hard:\n    pods: \"{running}\"\n"
        ),
    )?;
    stack
        .plane
        .wait_kubectl(
            "the quota to count the namespace's pods",
            STEP,
            &[
                "get",
                "quota",
                "pods",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.status.used.pods}",
            ],
            |used| used.trim() == running,
        )
        .await?;
    stack.patch_link(r#"{"spec":{"server":{"replicas":3}}}"#)?;
    let mut missing = String::new();
    wait::until("the missing server reported", STEP, || {
        missing = cplink_ok(&stack, &["status"]).unwrap_or_default();
        missing.contains("\nServers:       2/3 ready (") && missing.contains("exceeded quota")
    })
    .await
    .map_err(|e| e.context(missing.clone()))?;
    assert_eq!(rows(&missing, "SERVER").len(), 2, "{missing}");
    assert!(!missing.contains("not linked"), "{missing}");
    println!(
        "kubectl cplink on {} real nodes, reading the debug views through the pod proxy and \
         the tunnel: status of a healthy link (2/2 servers, 3/3 agents, every one linked), \
         routes by node name, node IP and pod address, a followed log among the connections \
         of {node_1}, a passing check of {node_1}; routes to `any` and a failed check for an \
         unknown node; {node_2}'s agent in CrashLoopBackOff ({kills} kills) reported not \
         linked to either server; a third server refused by a quota reported missing",
        nodes.len()
    );
    steps.enter("stopping the stack");
    stack.stop_leaving_nothing()
}
