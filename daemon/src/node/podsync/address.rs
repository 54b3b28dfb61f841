//! The Pod's address across a move (`keepIP`). The target learns whether its sandbox took
//! the source's address over (podmig's CNI plugin gave it, after checking the move's
//! record), restores the connections then instead of closing them, tells the source to
//! hold the address, and announces it once the source took the commit. The source holds
//! the address's traffic from before its freeze: a frozen or dying copy never ACKs, resets
//! or closes what the target carries on; a rollback releases it.

use std::net::Ipv4Addr;

use podmig_cri_ext::{
    engine::CheckpointEngine,
    proto::hook::v1::{ContainerIdentity, RestoreFrom, hook_response::Decision as Answer},
};

use super::PodWorker;
use crate::keepip;

/// An address this node holds for a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeptIp {
    /// The address.
    pub(super) ip: Ipv4Addr,
    /// The Pod's device on this node.
    pub(super) dev: String,
    /// The sandbox whose hold rules these are.
    pub(super) sandbox: String,
}

/// Why a source cannot hold its address for the target.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The target asked for an address this Pod does not have.
    #[error("the target asks to keep address {asked}, but this Pod's is {own}")]
    NotOurs {
        /// Asked for.
        asked: String,
        /// This Pod's.
        own: String,
    },
    /// The address is not routed to a device of this node.
    #[error("address {0} is not on this node")]
    NotHere(Ipv4Addr),
    /// No sandbox known for the Pod's containers.
    #[error("the Pod's sandbox is unknown")]
    NoSandbox,
    /// The rules could not be set.
    #[error(transparent)]
    Network(#[from] keepip::KeepIpError),
}

impl<E: CheckpointEngine> PodWorker<E> {
    /// Target: the source's address, when this sandbox took it over; a move that asked to
    /// keep it and could not says so in an Event (its connections will be closed).
    pub(super) fn address_taken_over(
        &self,
        c: &ContainerIdentity,
        source_node: Option<&str>,
    ) -> Option<KeptIp> {
        let asked = c.annotations.get(podmig_api::ANNOTATION_POD_IP)?;
        let here = &self.node.settings.node_name;
        let why_not = match keepip::parse(asked) {
            Err(e) => e.to_string(),
            Ok(_) if source_node == Some(here.as_str()) => {
                "the source runs on this node, where two Pods cannot share it".into()
            }
            Ok(ip) => match keepip::local_device(ip) {
                Ok(Some(dev)) => {
                    tracing::info!(pod_uid = %self.uid, %ip, %dev, "the target's sandbox took the source's address over");
                    return Some(KeptIp {
                        ip,
                        dev,
                        sandbox: c.sandbox_id.clone(),
                    });
                }
                Ok(None) => format!(
                    "node {here}'s network gave the target a new address (is podmig-cni in its CNI \
                     configuration?)"
                ),
                Err(e) => e.to_string(),
            },
        };
        let note = format!(
            "the Pod's address {asked} is not kept: {why_not}; its established connections are \
             closed by the move and clients must reconnect"
        );
        tracing::warn!(pod_uid = %self.uid, %note, "address not kept");
        self.node
            .event_on_pod(&c.pod_namespace, &c.pod_name, "PodIPNotKept", &note);
        None
    }

    /// How the runtime restores a target's container from `dir`: its connections restored
    /// where the address was kept, closed otherwise.
    pub(super) fn restore_answer(&self, dir: &std::path::Path, lazy: bool) -> Answer {
        let path = dir.display().to_string();
        Answer::RestoreFrom(RestoreFrom {
            image_path: path.clone(),
            work_path: if lazy { path } else { String::new() },
            lazy_pages: lazy,
            tcp_established: self.kept_ip.is_some(),
            ..Default::default()
        })
    }

    /// Target: the restore starts; the network sends the address here from now on. A
    /// packet that comes before its socket would be answered by a reset: those are held
    /// until [`Self::restored_kept_address`] (the client retransmits instead). Announcing
    /// only after the restore would cost a retransmission timeout (1 s for a restored
    /// socket): the first segment the resumed Pod sends would find its ACK still routed
    /// to the frozen source.
    pub(super) fn announce_kept_address(&self) {
        let Some(k) = &self.kept_ip else {
            return;
        };
        // The address may come back to a node it left: the holds its old sandbox set here
        // would drop the new Pod's traffic until that sandbox is removed.
        match keepip::release_others(k.ip, &k.sandbox) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(pod_uid = %self.uid, ip = %k.ip, rules = n, "released the holds a moved-away copy left on the address")
            }
            Err(error) => {
                tracing::warn!(pod_uid = %self.uid, ip = %k.ip, %error, "cannot release old holds of the address")
            }
        }
        let done = keepip::hold_resets(k.ip, &k.dev, &k.sandbox)
            .and_then(|()| keepip::forget_neighbour(k.ip, &k.dev))
            .and_then(|()| keepip::announce(k.ip, &k.dev));
        match done {
            Ok(()) => {
                tracing::info!(pod_uid = %self.uid, ip = %k.ip, dev = %k.dev, "kept address announced")
            }
            Err(error) => {
                tracing::warn!(pod_uid = %self.uid, ip = %k.ip, %error, "cannot announce the kept address")
            }
        }
    }

    /// Target: the restore ended; its sockets answer for themselves.
    pub(super) fn restored_kept_address(&self) {
        if let Some(k) = &self.kept_ip
            && let Err(error) = keepip::release(&k.sandbox)
        {
            tracing::warn!(pod_uid = %self.uid, ip = %k.ip, %error, "cannot release the held resets");
        }
    }

    /// Target: the verdict is in. A restored copy the source did not let run gives the
    /// address back: its route goes (the source resumes and is reached again).
    pub(super) fn settle_kept_address(&mut self, committed: bool) {
        let Some(k) = self.kept_ip.take() else {
            return;
        };
        if committed {
            return;
        }
        if let Err(error) = keepip::unroute(k.ip) {
            tracing::warn!(pod_uid = %self.uid, ip = %k.ip, %error, "cannot withdraw the kept address");
        }
    }

    /// Source, before the freeze: refuses new connections to this Pod's address `asked`
    /// (one accepted by the kernel while the Pod is frozen would be lost in the move);
    /// [`Self::hold_traffic`] follows the freeze. Both last until the sandbox is gone (its
    /// CNI `DEL`) or the move rolls back.
    pub(super) fn hold_own_address(
        &self,
        asked: &str,
        container_id: &str,
    ) -> Result<KeptIp, HoldError> {
        let own = self
            .pod
            .as_ref()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        if own != asked {
            return Err(HoldError::NotOurs {
                asked: asked.to_owned(),
                own,
            });
        }
        let ip = keepip::parse(asked)?;
        let dev = keepip::local_device(ip)?.ok_or(HoldError::NotHere(ip))?;
        let sandbox =
            podmig_cri_ext::identity::sandbox_of(&self.node.settings.runc_root, container_id)
                .ok_or(HoldError::NoSandbox)?;
        keepip::refuse_new(ip, &dev, &sandbox)?;
        Ok(KeptIp { ip, dev, sandbox })
    }

    /// Source, frozen: drops the address's traffic, so that the frozen copy's kernel
    /// neither ACKs nor sends anything the target's restored sockets will not know of.
    pub(super) fn hold_traffic(&self, k: &KeptIp) -> Result<(), HoldError> {
        keepip::hold(k.ip, &k.dev, &k.sandbox)?;
        tracing::info!(pod_uid = %self.uid, ip = %k.ip, dev = %k.dev, "holding the address's traffic for the move");
        Ok(())
    }

    /// Source: the move rolled back; the address's traffic flows again, to this node.
    pub(super) fn release_own_address(&self, held: &KeptIp) {
        match keepip::release_and_reclaim(&held.sandbox) {
            Ok(again) if !again.is_empty() => {
                tracing::info!(pod_uid = %self.uid, ip = %held.ip, "announced the address again after the failed move")
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(pod_uid = %self.uid, ip = %held.ip, %error, "cannot release the held address")
            }
        }
    }
}
