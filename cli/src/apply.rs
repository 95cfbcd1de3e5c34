//! `llmos apply FILE`: makes the cluster's deployments what a file lists.
//!
//! The file is `{"models": [ {name, source, ...}, ... ]}` (the Helm chart's
//! `models:` values, as JSON). A model that is not deployed is deployed; one
//! whose replica count or layer split differs is scaled or re-split; one
//! whose source differs is an error naming it (changing what a model is
//! takes an undeploy first). Models deployed but not listed are left alone.
//! It then waits until every listed model serves with the replicas asked
//! for. Coordinators that are not up yet, or a leader being elected, are
//! waited for (a Kubernetes hook Job runs this beside starting pods).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::Channel;
use anyhow::{Context, Result};
use clap::Args;
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use serde::Deserialize;
use serde_json::json;

#[derive(Args, Clone)]
pub struct ApplyArgs {
    /// JSON file: {"models": [{"name": .., "source": .., "replicas": ..}, ..]}.
    pub file: std::path::PathBuf,
    /// Seconds to wait for every model to serve as listed.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct File {
    models: Vec<Model>,
}

/// One desired deployment; the keys of the chart's `models:` list.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Model {
    name: String,
    source: String,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    quantize: Option<String>,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    stages: Option<u32>,
    #[serde(default)]
    split: Vec<u32>,
    #[serde(default)]
    tp: Option<u32>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    kv_blocks: Option<u32>,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    max_batch_tokens: Option<u32>,
    #[serde(default)]
    max_running: Option<u32>,
    #[serde(default)]
    max_waiting: Option<u32>,
    #[serde(default)]
    prefix_caching: Option<bool>,
    #[serde(default)]
    pipeline_transport: Option<String>,
    #[serde(default)]
    kv_cache_dtype: Option<String>,
    #[serde(default)]
    autoscale: Option<Autoscale>,
}

#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
struct Autoscale {
    min: u32,
    max: u32,
}

fn load(path: &std::path::Path) -> Result<Vec<Model>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: File = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a models file", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    for (i, m) in file.models.iter().enumerate() {
        anyhow::ensure!(
            !m.name.is_empty(),
            "{}: models[{i}].name is empty",
            path.display()
        );
        anyhow::ensure!(
            !m.source.is_empty(),
            "{}: models[{i}] ({}): source is empty",
            path.display(),
            m.name
        );
        anyhow::ensure!(
            seen.insert(m.name.clone()),
            "{}: model {:?} is listed twice",
            path.display(),
            m.name
        );
        if let Some(a) = m.autoscale {
            anyhow::ensure!(
                a.min >= 1 && a.min <= a.max,
                "{}: model {:?}: autoscale needs 1 <= min <= max (got min {}, max {})",
                path.display(),
                m.name,
                a.min,
                a.max
            );
        }
    }
    Ok(file.models)
}

impl Model {
    fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(1).max(1)
    }

    fn deploy_request(&self) -> api::DeployModelRequest {
        api::DeployModelRequest {
            name: self.name.clone(),
            source: self.source.clone(),
            stages: if self.split.is_empty() {
                self.stages.unwrap_or(0)
            } else {
                self.split.len() as u32
            },
            layer_split: self.split.clone(),
            dtype: self.dtype.clone().unwrap_or_else(|| "f32".into()),
            quantization: self.quantize.clone().unwrap_or_else(|| "none".into()),
            tensor_parallel: self.tp.unwrap_or(1),
            serving: Some(api::ServingOptions {
                kv_cache_blocks: self.kv_blocks.unwrap_or(0),
                block_size: self.block_size.unwrap_or(0),
                max_batch_tokens: self.max_batch_tokens.unwrap_or(0),
                max_running: self.max_running.unwrap_or(0),
                max_waiting: self.max_waiting.unwrap_or(0),
                disable_prefix_caching: !self.prefix_caching.unwrap_or(true),
                pipeline_transport: self
                    .pipeline_transport
                    .clone()
                    .unwrap_or_else(|| "auto".into()),
                kv_cache_dtype: self.kv_cache_dtype.clone().unwrap_or_else(|| "auto".into()),
            }),
            wait: Some(false),
            wait_timeout_ms: 0,
            replicas: self.replicas(),
            pool: self.pool.clone().unwrap_or_default(),
            labels: self.labels.clone().into_iter().collect(),
            autoscale_min: self.autoscale.map_or(0, |a| a.min),
            autoscale_max: self.autoscale.map_or(0, |a| a.max),
        }
    }
}

/// Layers per stage of a placement.
fn split_of(stages: &[api::StagePlacement]) -> Vec<u32> {
    stages.iter().map(|s| s.layer_end - s.layer_start).collect()
}

/// What `apply` does to one listed model, given what is deployed.
#[derive(Debug, PartialEq)]
enum Action {
    Deploy,
    Scale { from: u32, to: u32 },
    Resplit { from: Vec<u32>, to: Vec<u32> },
    Keep,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Deploy => write!(f, "deploy"),
            Action::Scale { from, to } => write!(f, "scale {from} -> {to} replicas"),
            Action::Resplit { from, to } => write!(f, "re-split {from:?} -> {to:?}"),
            Action::Keep => write!(f, "as listed"),
        }
    }
}

fn plan(want: &Model, have: Option<&api::ModelStatus>) -> Result<Vec<Action>> {
    let Some(have) = have else {
        return Ok(vec![Action::Deploy]);
    };
    anyhow::ensure!(
        have.source == want.source,
        "model {:?} is deployed from {:?}, the file asks for {:?}; `llmos undeploy {}` first to change what it is",
        want.name,
        have.source,
        want.source,
        want.name
    );
    let mut actions = Vec::new();
    // An autoscaled model's count is the autoscaler's to change.
    if want.autoscale.is_none() && have.replicas_desired != want.replicas() {
        actions.push(Action::Scale {
            from: have.replicas_desired,
            to: want.replicas(),
        });
    }
    let current = split_of(&have.stages);
    if !want.split.is_empty() && !current.is_empty() && current != want.split {
        actions.push(Action::Resplit {
            from: current,
            to: want.split.clone(),
        });
    }
    if actions.is_empty() {
        actions.push(Action::Keep);
    }
    Ok(actions)
}

pub async fn run(addresses: &[String], a: &ApplyArgs) -> Result<()> {
    let models = load(&a.file)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let mut round = 0usize;
    loop {
        let url = &addresses[round % addresses.len()];
        round += 1;
        let r = match super::channel(url).await {
            Ok(ch) => apply_on(ch, &models, deadline).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                super::print_json(
                    json!({"applied": models.iter().map(|m| &m.name).collect::<Vec<_>>(),
                    "seconds": started.elapsed().as_secs_f64()}),
                );
                return Ok(());
            }
            // Not up yet (unreachable, no leader): try again.
            Err(e) if super::try_next(&e) && Instant::now() < deadline => {
                eprintln!("coordinator {url}: {e:#}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn apply_on(ch: Channel, models: &[Model], deadline: Instant) -> Result<()> {
    let mut admin = AdminClient::new(ch);
    let status = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .map_err(super::status_error)?
        .into_inner();
    for want in models {
        let have = status.models.iter().find(|m| m.name == want.name);
        for action in plan(want, have)? {
            match &action {
                Action::Deploy => {
                    admin
                        .deploy_model(want.deploy_request())
                        .await
                        .map_err(super::status_error)
                        .with_context(|| format!("deploying {}", want.name))?;
                }
                Action::Scale { to, .. } => {
                    admin
                        .scale_model(api::ScaleModelRequest {
                            name: want.name.clone(),
                            replicas: *to,
                            wait: Some(false),
                            wait_timeout_ms: 0,
                        })
                        .await
                        .map_err(super::status_error)
                        .with_context(|| format!("scaling {}", want.name))?;
                }
                Action::Resplit { to, .. } => {
                    admin
                        .resplit_model(api::ResplitModelRequest {
                            name: want.name.clone(),
                            stages: to.len() as u32,
                            layer_split: to.clone(),
                            wait: Some(false),
                            wait_timeout_ms: 0,
                        })
                        .await
                        .map_err(super::status_error)
                        .with_context(|| format!("re-splitting {}", want.name))?;
                }
                Action::Keep => {}
            }
            eprintln!("{}: {action}", want.name);
        }
    }
    // Then wait until each serves as listed.
    let mut last_said = String::new();
    loop {
        let status = admin
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .map_err(super::status_error)?
            .into_inner();
        let mut waiting = Vec::new();
        for want in models {
            let Some(m) = status.models.iter().find(|m| m.name == want.name) else {
                anyhow::bail!("model {:?} was undeployed while applying", want.name);
            };
            if m.state.starts_with("Failed") {
                anyhow::bail!("model {:?} failed: {}", want.name, m.reason);
            }
            let ready = m.replicas.iter().filter(|r| r.state == "Ready").count() as u32;
            let enough = match want.autoscale {
                Some(a) => ready >= a.min,
                None => ready == want.replicas() && m.replicas.len() as u32 == want.replicas(),
            };
            if m.state != "Ready" || !enough {
                waiting.push(format!(
                    "{}: {} ({} of {} replicas ready){}",
                    want.name,
                    m.state,
                    ready,
                    m.replicas_desired,
                    if m.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", m.reason)
                    }
                ));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        let said = waiting.join("; ");
        if said != last_said {
            eprintln!("waiting: {said}");
            last_said = said;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every model serves as listed before the timeout: {last_said}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: &str) -> Model {
        serde_json::from_str(json).unwrap()
    }

    fn deployed(source: &str, replicas: u32, split: &[u32]) -> api::ModelStatus {
        let mut start = 0;
        api::ModelStatus {
            name: "m".into(),
            source: source.into(),
            replicas_desired: replicas,
            stages: split
                .iter()
                .map(|n| {
                    start += n;
                    api::StagePlacement {
                        layer_start: start - n,
                        layer_end: start,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_missing_model_is_deployed_a_changed_count_scaled_a_changed_split_resplit() {
        let m = model(r#"{"name":"m","source":"smollm2","replicas":2,"split":[10,20]}"#);
        assert_eq!(plan(&m, None).unwrap(), vec![Action::Deploy]);
        assert_eq!(
            plan(&m, Some(&deployed("smollm2", 2, &[10, 20]))).unwrap(),
            vec![Action::Keep]
        );
        assert_eq!(
            plan(&m, Some(&deployed("smollm2", 1, &[15, 15]))).unwrap(),
            vec![
                Action::Scale { from: 1, to: 2 },
                Action::Resplit {
                    from: vec![15, 15],
                    to: vec![10, 20]
                }
            ]
        );
        let e = plan(&m, Some(&deployed("/models/other.gguf", 2, &[10, 20])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("undeploy") && e.contains("other.gguf"), "{e}");
    }

    #[test]
    fn an_autoscaled_models_count_is_left_to_the_autoscaler() {
        let m = model(r#"{"name":"m","source":"smollm2","autoscale":{"min":1,"max":3}}"#);
        assert_eq!(
            plan(&m, Some(&deployed("smollm2", 3, &[30]))).unwrap(),
            vec![Action::Keep]
        );
        let r = m.deploy_request();
        assert_eq!((r.autoscale_min, r.autoscale_max, r.replicas), (1, 3, 1));
    }

    #[test]
    fn the_file_is_checked_with_the_field_named() {
        let dir = std::env::temp_dir().join(format!("llmos-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("models.json");
        std::fs::write(
            &f,
            r#"{"models":[{"name":"m","source":"smollm2","replica":2}]}"#,
        )
        .unwrap();
        let e = format!("{:#}", load(&f).unwrap_err());
        assert!(e.contains("replica") && e.contains("models.json"), "{e}");
        std::fs::write(&f, r#"{"models":[{"name":"m","source":""}]}"#).unwrap();
        let e = format!("{:#}", load(&f).unwrap_err());
        assert!(e.contains("source is empty"), "{e}");
        std::fs::write(
            &f,
            r#"{"models":[{"name":"m","source":"a"},{"name":"m","source":"b"}]}"#,
        )
        .unwrap();
        assert!(format!("{:#}", load(&f).unwrap_err()).contains("listed twice"));
        std::fs::write(
            &f,
            r#"{"models":[{"name":"m","source":"smollm2","replicas":2,"kvBlocks":64,"prefixCaching":false,"labels":{"zone":"a"}}]}"#,
        )
        .unwrap();
        let ms = load(&f).unwrap();
        let r = ms[0].deploy_request();
        let serving = r.serving.unwrap();
        assert_eq!((r.replicas, serving.kv_cache_blocks), (2, 64));
        assert!(serving.disable_prefix_caching);
        assert_eq!(r.labels.get("zone").map(String::as_str), Some("a"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
