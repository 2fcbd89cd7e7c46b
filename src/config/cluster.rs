//! `[cluster]`: many vigil processes share one config and split its cameras. Each camera goes
//! to the replica that scores highest for it under rendezvous (highest random weight) hashing:
//! every camera has exactly one owner, the choice needs no coordination, and adding a replica
//! moves only the cameras the new one wins (about 1/N of them).

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Config;

/// Most replicas a config may name.
pub const MAX_REPLICAS: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// How many vigil processes share this config's cameras.
    pub replicas: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { replicas: 1 }
    }
}

/// The replica (0-based) that owns `camera` among `replicas`.
pub fn owner(camera: &str, replicas: u32) -> u32 {
    (0..replicas.max(1))
        .max_by_key(|r| {
            let mut h = Sha256::new();
            h.update(camera.as_bytes());
            h.update([0]);
            h.update(r.to_be_bytes());
            let d = h.finalize();
            (u64::from_be_bytes(d[..8].try_into().expect("8 bytes")), *r)
        })
        .unwrap_or(0)
}

/// Where the replica's index comes from, in order: `--replica`, `VIGIL_REPLICA`, a
/// StatefulSet-style host name ending in `-<index>`.
pub fn replica_index(
    given: Option<u32>,
    env: Option<&str>,
    hostname: Option<&str>,
    replicas: u32,
) -> Result<Option<u32>, String> {
    if replicas <= 1 {
        return match given {
            Some(i) if i > 0 => Err(format!(
                "replica {i} given, but [cluster] replicas is {replicas}"
            )),
            _ => Ok(None),
        };
    }
    let index = if let Some(i) = given {
        i
    } else if let Some(v) = env.map(str::trim).filter(|v| !v.is_empty()) {
        v.parse()
            .map_err(|_| format!("VIGIL_REPLICA={v:?} is not a replica index"))?
    } else if let Some(i) = hostname
        .and_then(|h| h.trim().rsplit_once('-'))
        .and_then(|(_, n)| n.parse().ok())
    {
        i
    } else {
        return Err(format!(
            "[cluster] replicas = {replicas}, and this process does not know which it is: give \
             --replica <0..{replicas}>, VIGIL_REPLICA, or a host name ending in -<index> (a \
             StatefulSet's pods are named so)"
        ));
    };
    if index >= replicas {
        return Err(format!(
            "replica {index} is out of range: [cluster] replicas = {replicas} (0..{})",
            replicas - 1
        ));
    }
    Ok(Some(index))
}

impl Config {
    /// This replica's share of the config: the cameras it owns, and its own MQTT client id,
    /// Home Assistant node id and status topic (`<prefix>/status/<index>`), so that replicas on
    /// one broker never take each other's session, entities or status. `None`: the whole
    /// config, unchanged.
    pub fn for_replica(mut self, index: Option<u32>) -> Config {
        let Some(i) = index else {
            return self;
        };
        let n = self.cluster.replicas;
        self.cameras.retain(|name, _| owner(name, n) == i);
        let node = self
            .homeassistant
            .node_id
            .clone()
            .unwrap_or_else(|| self.mqtt.client_id.clone());
        self.homeassistant.node_id = Some(format!("{node}-{i}"));
        self.mqtt.client_id = format!("{}-{i}", self.mqtt.client_id);
        self.mqtt.replica = Some(i);
        self
    }

    /// The cameras of the config each replica owns, by replica.
    pub fn cameras_by_replica(&self) -> Vec<Vec<&str>> {
        let n = self.cluster.replicas.max(1);
        let mut out = vec![Vec::new(); n as usize];
        for name in self.cameras.keys() {
            out[owner(name, n) as usize].push(name.as_str());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cam-{i}")).collect()
    }

    #[test]
    fn every_camera_has_one_owner_and_the_shares_are_even() {
        let cams = names(3000);
        let mut counts = [0usize; 3];
        for c in &cams {
            counts[owner(c, 3) as usize] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), 3000);
        for c in counts {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn a_fourth_replica_moves_about_a_quarter_and_only_to_itself() {
        let cams = names(4000);
        let moved: Vec<&String> = cams.iter().filter(|c| owner(c, 3) != owner(c, 4)).collect();
        assert!(
            (800..1200).contains(&moved.len()),
            "{} of 4000 moved",
            moved.len()
        );
        assert!(moved.iter().all(|c| owner(c, 4) == 3));
    }

    #[test]
    fn the_index_comes_from_the_flag_the_environment_or_the_host_name() {
        assert_eq!(replica_index(None, None, None, 1), Ok(None));
        assert_eq!(
            replica_index(Some(2), Some("1"), Some("vigil-0"), 3),
            Ok(Some(2))
        );
        assert_eq!(
            replica_index(None, Some("1"), Some("vigil-0"), 3),
            Ok(Some(1))
        );
        assert_eq!(replica_index(None, None, Some("vigil-2"), 3), Ok(Some(2)));
        assert!(replica_index(None, None, Some("edge-box"), 3).is_err());
        assert!(
            replica_index(Some(3), None, None, 3)
                .unwrap_err()
                .contains("out of range")
        );
        assert!(replica_index(None, Some("x"), None, 3).is_err());
        assert!(replica_index(Some(1), None, None, 1).is_err());
    }

    #[test]
    fn a_replica_keeps_its_cameras_and_gets_its_own_ids() {
        let mut text = String::from("[cluster]\nreplicas = 3\n[mqtt]\nclient_id = \"site\"\n");
        for c in names(12) {
            text.push_str(&format!("[cameras.{c}]\nsource = \"test\"\n"));
        }
        let config = Config::parse(&text, ".".into()).unwrap();
        let shares = config.cameras_by_replica();
        assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), 12);
        let mine = config.clone().for_replica(Some(1));
        let kept: Vec<&str> = mine.cameras.keys().map(String::as_str).collect();
        assert_eq!(kept, shares[1]);
        assert_eq!(mine.mqtt.client_id, "site-1");
        assert_eq!(mine.homeassistant.node_id.as_deref(), Some("site-1"));
        assert_eq!(mine.mqtt.status_topic(), "vigil/status/1");
        assert_eq!(config.clone().for_replica(None), config);
        assert_eq!(config.mqtt.status_topic(), "vigil/status");
    }
}
