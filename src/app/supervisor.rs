//! The supervisor: reloads the config on request (SIGHUP), switches models when their files
//! change (`model.watch`), puts heads' new versions in service, samples the console's figures, prunes old snapshots, and lets the graph finish once every source has
//! ended.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::ops::service::Service;
use crate::shutdown::{Exits, Joinable, Shutdown};

/// How often the supervisor looks whether every source has ended.
const POLL: Duration = Duration::from_millis(100);

/// How often it looks at the heads' versions in service.
const HEADS_POLL: Duration = Duration::from_secs(1);

/// Runs on a thread watched through `exits`: a panic in it stops vigil.
pub fn spawn(
    service: Arc<Service>,
    model_watch: Option<Duration>,
    reload: Receiver<()>,
    stop: Shutdown,
    exits: &Exits,
) -> Joinable {
    let watch = match model_watch {
        Some(interval) => crossbeam_channel::tick(interval),
        None => crossbeam_channel::never(),
    };
    let prune = crossbeam_channel::tick(Duration::from_secs(60));
    let heads = crossbeam_channel::tick(HEADS_POLL);
    let sample = crossbeam_channel::tick(crate::ops::system::INTERVAL);
    let poll = crossbeam_channel::tick(POLL);
    exits
        .spawn("supervisor".into(), move || {
            let mut reload = reload;
            // The console's rates come from two samples: the first at once.
            service.sample_system();
            loop {
                crossbeam_channel::select! {
                    recv(stop.receiver()) -> _ => return,
                    recv(reload) -> r => match r {
                        Ok(()) => {
                            tracing::info!("reloading the config (SIGHUP)");
                            if let Err(e) = service.reload_config() {
                                tracing::warn!(error = %e, "config reload refused");
                            }
                        }
                        Err(_) => reload = crossbeam_channel::never(),
                    },
                    recv(watch) -> _ => service.check_model_files(),
                    recv(heads) -> _ => service.check_heads(),
                    recv(sample) -> _ => service.sample_system(),
                    recv(prune) -> _ => {
                        if let Some(s) = &service.shared.snapshots {
                            s.prune();
                        }
                    }
                    recv(poll) -> _ => {
                        if service.sources_finished() {
                            // Every source ended (files that do not loop): vigil is done.
                            service.control.seal();
                            return;
                        }
                    }
                }
            }
        })
        .expect("spawning the supervisor")
}
