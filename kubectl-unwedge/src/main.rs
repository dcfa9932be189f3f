//! `kubectl unwedge`: see and steer GpuWedge incidents (docs/design.md §4).
//!
//! Reads GpuWedges, RecoveryPolicies and Events; writes only the human-verb annotations
//! (`unwedge.io/approve|retry|abandon` with `unwedge.io/by`). The operator does the rest.

mod error;
mod present;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use unwedge_crds::{GpuWedge, RecoveryPolicy};

use error::{CliError, Target};
use verbs::Verb;

/// See and steer GPU wedge incidents handled by unwedge.
#[derive(Parser, Debug)]
#[command(name = "kubectl unwedge", version, about)]
struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Wedges across the fleet, with their queue position when they wait for budget.
    List,
    /// A wedge and the timeline of its incident.
    Describe {
        /// The GpuWedge.
        name: String,
    },
    /// Approve a wedge that waits for a human (AwaitingApproval or NeedsAttention).
    Approve {
        /// The GpuWedge.
        name: String,
        /// The method to carry out (default: the rung the operator planned).
        #[arg(long)]
        method: Option<String>,
    },
    /// Start a new attempt from the current rung (NeedsAttention, or after a failed attempt).
    Retry {
        /// The GpuWedge.
        name: String,
    },
    /// Hand the incident to a human: unwedge lets go, the node stays cordoned.
    Abandon {
        /// The GpuWedge.
        name: String,
        /// Why (recorded on the wedge).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Per RecoveryPolicy: nodes selected, allowed, in use, reboots, devices, queued.
    Budget,
}

const WEDGES: &str = "gpuwedges.unwedge.io";
const POLICIES: &str = "recoverypolicies.unwedge.io";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn client(cli: &Cli) -> Result<Client, CliError> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| CliError::Config(e.to_string()))?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| CliError::Config(e.to_string()))?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| CliError::Config(e.to_string()))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let client = client(&cli).await?;
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    match cli.command {
        Command::List => {
            let list = list_wedges(&wedges).await?;
            if list.is_empty() {
                println!("No GpuWedges: no GPU has wedged (or none was reported).");
                return Ok(());
            }
            let rows = present::list_rows(&list, Timestamp::now());
            print!("{}", present::render_table(&present::LIST_HEADERS, &rows));
        }
        Command::Describe { name } => {
            let w = get_wedge(&wedges, &name).await?;
            let (events, note) = wedge_events(&client, &name).await;
            print!("{}", describe(&w));
            println!("\nTimeline:");
            print!(
                "{}",
                present::render_timeline(&present::timeline(&w, &events))
            );
            if let Some(note) = note {
                println!("(events not shown: {note})");
            }
        }
        Command::Approve { name, method } => {
            let w = get_wedge(&wedges, &name).await?;
            let policy = match present::policy_of(&w) {
                Some(p) if method.is_some() => Some(policies.get(p).await.map_err(|e| {
                    Target {
                        verb: "get",
                        resource: POLICIES,
                        kind: "RecoveryPolicy",
                        name: Some(p),
                    }
                    .err(e)
                })?),
                _ => None,
            };
            verbs::check_approve(&w, method.as_deref(), policy.as_ref())?;
            let by = whoami(&client).await?;
            let m = method.clone().unwrap_or_default();
            write_verb(&wedges, &name, &Verb::Approve(m), &by).await?;
            match method {
                Some(m) => println!("gpuwedge/{name} approved with method {m} by {by}"),
                None => {
                    println!("gpuwedge/{name} approved (the operator's planned method) by {by}")
                }
            }
            println!(
                "The operator records the approval in status.approval; follow it with `kubectl unwedge describe {name}`."
            );
        }
        Command::Retry { name } => {
            let w = get_wedge(&wedges, &name).await?;
            verbs::check_retry(&w)?;
            let by = whoami(&client).await?;
            let token = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
            write_verb(&wedges, &name, &Verb::Retry(token), &by).await?;
            println!(
                "gpuwedge/{name}: retry requested by {by}; the operator starts a new attempt from the current rung."
            );
        }
        Command::Abandon { name, reason } => {
            let w = get_wedge(&wedges, &name).await?;
            verbs::check_abandon(&w)?;
            let by = whoami(&client).await?;
            let reason = reason.unwrap_or_else(|| "abandoned with kubectl unwedge".into());
            write_verb(&wedges, &name, &Verb::Abandon(reason), &by).await?;
            println!("{}", verbs::abandon_meaning(&name, &w.spec.node_name));
            println!("gpuwedge/{name} abandoned by {by}.");
        }
        Command::Budget => {
            let ps = policies
                .list(&ListParams::default())
                .await
                .map_err(|e| {
                    Target {
                        verb: "list",
                        resource: POLICIES,
                        kind: "RecoveryPolicy",
                        name: None,
                    }
                    .err(e)
                })?
                .items;
            if ps.is_empty() {
                println!(
                    "No RecoveryPolicies: the operator admits nothing until one exists (the chart installs a default)."
                );
                return Ok(());
            }
            let ws = list_wedges(&wedges).await?;
            let rows = present::budget_rows(&ps, &ws);
            print!(
                "{}",
                present::render_table(&present::BUDGET_HEADERS, &present::budget_cells(&rows))
            );
        }
    }
    Ok(())
}

async fn list_wedges(api: &Api<GpuWedge>) -> Result<Vec<GpuWedge>, CliError> {
    Ok(api
        .list(&ListParams::default())
        .await
        .map_err(|e| {
            Target {
                verb: "list",
                resource: WEDGES,
                kind: "GpuWedge",
                name: None,
            }
            .err(e)
        })?
        .items)
}

async fn get_wedge(api: &Api<GpuWedge>, name: &str) -> Result<GpuWedge, CliError> {
    api.get(name).await.map_err(|e| {
        Target {
            verb: "get",
            resource: WEDGES,
            kind: "GpuWedge",
            name: Some(name),
        }
        .err(e)
    })
}

/// The Events about the wedge in any namespace (cluster-scoped objects' events land in
/// `default` or the writer's namespace). Events are context: without the right to list
/// them the timeline is still shown, with a note.
async fn wedge_events(client: &Client, name: &str) -> (Vec<Event>, Option<String>) {
    let api: Api<Event> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=GpuWedge,involvedObject.name={name}"
    ));
    match api.list(&lp).await {
        Ok(l) => (l.items, None),
        Err(e) => (
            Vec::new(),
            Some(
                Target {
                    verb: "list",
                    resource: "events",
                    kind: "Event",
                    name: None,
                }
                .err(e)
                .to_string(),
            ),
        ),
    }
}

/// The username the API server sees for our credentials (authentication.k8s.io/v1
/// SelfSubjectReview): the admission policy refuses a `unwedge.io/by` that differs from it.
async fn whoami(client: &Client) -> Result<String, CliError> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let target = Target {
        verb: "create",
        resource: "selfsubjectreviews.authentication.k8s.io",
        kind: "SelfSubjectReview",
        name: None,
    };
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|e| target.err(e))?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            CliError::Config(
                "the API server did not say who you are (empty SelfSubjectReview)".into(),
            )
        })
}

async fn write_verb(
    api: &Api<GpuWedge>,
    name: &str,
    verb: &Verb,
    by: &str,
) -> Result<(), CliError> {
    let patch = verbs::annotation_patch(verb, by);
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            Target {
                verb: "patch",
                resource: WEDGES,
                kind: "GpuWedge",
                name: Some(name),
            }
            .err(e)
        })?;
    Ok(())
}

/// The header of `describe`: identity, state, and what is on the device.
fn describe(w: &GpuWedge) -> String {
    let s = w.status.clone().unwrap_or_default();
    let d = &w.spec.device;
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    kv("Name:", w.metadata.name.clone().unwrap_or_default());
    kv("Node:", w.spec.node_name.clone());
    let mut dev = d.pci_address.clone();
    for part in [d.card.as_deref(), d.render_node.as_deref()]
        .into_iter()
        .flatten()
    {
        dev.push_str(&format!(" {part}"));
    }
    if let Some(dra) = &d.dra {
        dev.push_str(&format!(
            " (DRA {}/{}/{})",
            dra.driver, dra.pool, dra.device
        ));
    }
    kv("Device:", dev);
    kv("Driver:", d.driver.clone());
    kv(
        "Methods:",
        s.methods
            .clone()
            .unwrap_or_else(|| w.spec.methods.join(",")),
    );
    kv("Phase:", format!("{:?}", present::phase_of(w)));
    kv("Action:", s.action.clone().unwrap_or_else(|| "-".into()));
    kv("Policy:", s.policy.clone().unwrap_or_else(|| "-".into()));
    if let Some(b) = &s.budget {
        kv("Budget:", b.clone());
    }
    if let Some(m) = &s.agent_message {
        kv("Agent says:", m.clone());
    }
    let consumers: Vec<String> = s
        .consumers
        .iter()
        .flatten()
        .map(|c| {
            format!(
                "{}/{} ({}) {}",
                c.namespace, c.pod, c.container, c.device_id
            )
        })
        .collect();
    kv(
        "Consumers:",
        if consumers.is_empty() {
            "-".into()
        } else {
            consumers.join(", ")
        },
    );
    let domain: Vec<String> = s
        .reset_domain
        .iter()
        .flatten()
        .map(|d| {
            format!(
                "{} [{}] by {}",
                d.pci_address,
                d.relation,
                d.methods.join("/")
            )
        })
        .collect();
    if !domain.is_empty() {
        kv("Reset domain:", domain.join(", "));
    }
    let ann = w.metadata.annotations.clone().unwrap_or_default();
    let verbs: Vec<String> = [
        "unwedge.io/approve",
        "unwedge.io/retry",
        "unwedge.io/abandon",
        "unwedge.io/by",
    ]
    .iter()
    .filter_map(|k| ann.get(*k).map(|v| format!("{k}={v:?}")))
    .collect();
    if !verbs.is_empty() {
        kv("Human verbs:", verbs.join(" "));
    }
    out
}
