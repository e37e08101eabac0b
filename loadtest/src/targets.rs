//! Where the load goes: regions and their edges, the authority's Admin endpoint, the API key,
//! from `--target REGION=ENDPOINT[,ENDPOINT…]` flags or from the state file `deploy/local/up`
//! writes.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

/// Most regions one run drives.
pub const REGIONS_MAX: usize = 16;
/// Most edges per region.
pub const EDGES_PER_REGION_MAX: usize = 64;

#[derive(Clone, Debug)]
pub struct Region {
    pub name: String,
    /// `http://host:port` of each edge.
    pub edges: Vec<String>,
    pub redis_url: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub regions: Vec<Region>,
    pub admin: Option<String>,
    pub api_key: Option<String>,
    pub postgres_url: Option<String>,
}

/// The parts of deploy/local's `state.json` this tool reads.
#[derive(Deserialize)]
struct StateFile {
    version: u32,
    api_key: String,
    admin_endpoint: String,
    postgres_url: Option<String>,
    regions: Vec<StateRegion>,
}

#[derive(Deserialize)]
struct StateRegion {
    name: String,
    redis_url: Option<String>,
    edges: Vec<String>,
}

fn endpoint(flag: &str, text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    let url = if text.starts_with("http://") {
        text.to_owned()
    } else if text.contains("://") {
        bail!("{flag}: {text:?} must be http://host:port or host:port (TLS is not built yet)")
    } else {
        format!("http://{text}")
    };
    let rest = &url["http://".len()..];
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .with_context(|| format!("{flag}: {text:?} has no port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("{flag}: {text:?} is not host:port");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl Targets {
    /// Reads `state.json` of deploy/local.
    pub fn from_state(path: &Path) -> anyhow::Result<Targets> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--state: reading {}", path.display()))?;
        let state: StateFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "--state: {} is not a deploy/local state file",
                path.display()
            )
        })?;
        if state.version != 1 {
            bail!("--state: version {} is not supported (1 is)", state.version);
        }
        let mut regions = Vec::new();
        for region in state.regions {
            let edges = region
                .edges
                .iter()
                .map(|e| endpoint("--state", e))
                .collect::<anyhow::Result<Vec<_>>>()?;
            regions.push(Region {
                name: region.name,
                edges,
                redis_url: region.redis_url,
            });
        }
        let targets = Targets {
            regions,
            admin: Some(endpoint("--state", &state.admin_endpoint)?),
            api_key: Some(state.api_key),
            postgres_url: state.postgres_url,
        };
        targets.check("--state")?;
        Ok(targets)
    }

    /// Parses `--target REGION=ENDPOINT[,ENDPOINT…]` flags (a region may be named twice).
    pub fn from_flags(flags: &[String]) -> anyhow::Result<Targets> {
        let mut targets = Targets::default();
        for flag in flags {
            let (name, endpoints) = flag.split_once('=').with_context(|| {
                format!("--target: {flag:?} is not REGION=ENDPOINT[,ENDPOINT…]")
            })?;
            let name = name.trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("--target: region name {name:?} must be letters, digits, - or _");
            }
            let edges = endpoints
                .split(',')
                .filter(|e| !e.trim().is_empty())
                .map(|e| endpoint("--target", e))
                .collect::<anyhow::Result<Vec<_>>>()?;
            match targets.regions.iter_mut().find(|r| r.name == name) {
                Some(region) => region.edges.extend(edges),
                None => targets.regions.push(Region {
                    name: name.to_owned(),
                    edges,
                    redis_url: None,
                }),
            }
        }
        targets.check("--target")?;
        Ok(targets)
    }

    fn check(&self, flag: &str) -> anyhow::Result<()> {
        if self.regions.is_empty() {
            bail!("{flag}: no region to send load to");
        }
        if self.regions.len() > REGIONS_MAX {
            bail!(
                "{flag}: {} regions, at most {REGIONS_MAX}",
                self.regions.len()
            );
        }
        for region in &self.regions {
            if region.edges.is_empty() || region.edges.len() > EDGES_PER_REGION_MAX {
                bail!(
                    "{flag}: region {} has {} edges, 1 to {EDGES_PER_REGION_MAX} allowed",
                    region.name,
                    region.edges.len()
                );
            }
        }
        Ok(())
    }

    pub fn edge_count(&self) -> usize {
        self.regions.iter().map(|r| r.edges.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_flags_name_regions_and_endpoints() {
        let targets = Targets::from_flags(&[
            "eu=127.0.0.1:1,http://127.0.0.1:2".into(),
            "us=127.0.0.1:3".into(),
            "eu=127.0.0.1:4".into(),
        ])
        .unwrap();
        assert_eq!(targets.regions.len(), 2);
        assert_eq!(targets.regions[0].edges.len(), 3);
        assert_eq!(targets.regions[1].edges, vec!["http://127.0.0.1:3"]);
        let bad = |flag: &str| {
            Targets::from_flags(&[flag.to_owned()])
                .unwrap_err()
                .to_string()
        };
        assert!(bad("eu").starts_with("--target:"));
        assert!(bad("eu=https://x:1").starts_with("--target:"));
        assert!(bad("eu=127.0.0.1").starts_with("--target:"));
        assert!(bad("e u=127.0.0.1:1").starts_with("--target:"));
        assert!(bad("eu=").starts_with("--target:"));
    }

    #[test]
    fn the_state_file_of_deploy_local() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(
            &path,
            r#"{"version": 1, "dir": "/x", "api_key": "k", "admin_endpoint": "http://127.0.0.1:9",
               "postgres_url": "postgres://postgres@127.0.0.1:8/tollgate", "postgres_dir": "/x/p",
               "regions": [{"name": "eu", "redis_url": "redis://127.0.0.1:7/", "key_prefix": "tg",
                            "edges": ["http://127.0.0.1:5"], "metrics": []}],
               "processes": []}"#,
        )
        .unwrap();
        let targets = Targets::from_state(&path).unwrap();
        assert_eq!(targets.admin.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(
            targets.regions[0].redis_url.as_deref(),
            Some("redis://127.0.0.1:7/")
        );
        std::fs::write(&path, "{}").unwrap();
        assert!(Targets::from_state(&path)
            .unwrap_err()
            .to_string()
            .starts_with("--state:"));
    }
}
