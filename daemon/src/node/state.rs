//! Where one container stands in a move, as one enum: every combination the daemon can be
//! in is a variant, every change is one method, and the runtime's questions (may it be
//! killed? created?) are answered by guards on it. Like youki's `ContainerStatus`.

use std::{path::PathBuf, time::Instant};

/// The move state of one container of a Pod on this node. A container with no move has
/// no entry ([`None`] in the tables that hold these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveState {
    /// Source: frozen and being dumped for move `migration`.
    Checkpointing {
        /// Id of the move.
        migration: String,
    },
    /// Source: dumped; the images are handed to the target, whose verdict is awaited.
    HandedOver {
        /// Id of the move.
        migration: String,
        /// The images (kept until the verdict: a rollback resumes from them).
        images: PathBuf,
        /// When the container was frozen.
        frozen_at: Instant,
    },
    /// Source: the target runs this container; it is never started here again.
    MigratedAway {
        /// Id of the move.
        migration: String,
        /// `namespace/name` of the target Pod and its node, for the status message.
        target: String,
    },
    /// Source: the move failed after the freeze; the next create of the container
    /// resumes it from these images (rollback).
    RollingBack {
        /// Id of the move.
        migration: String,
        /// Its own checkpoint.
        images: PathBuf,
    },
    /// Target: restore explicitly armed (CRI `RestoreContainer`) from these images.
    Armed {
        /// The images.
        images: PathBuf,
    },
    /// Target: the checkpoint is being fetched (or dumped, when the source is local).
    Receiving {
        /// Id of the move.
        migration: String,
    },
    /// Target or rollback: `runc restore` runs from these images.
    Restoring {
        /// Id of the move (empty for an armed restore).
        migration: String,
        /// The images.
        images: PathBuf,
        /// True when the container resumes on its own node after a failed move.
        rollback: bool,
    },
    /// Target: the container runs with the moved state; a later restart starts it fresh
    /// (its source is gone).
    Arrived,
    /// Target: the move failed; the container is refused (never started fresh while
    /// its source may resume).
    Abandoned {
        /// Why, for the runtime's error.
        reason: String,
    },
}

/// What the runtime's `kill` of a container does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillAnswer {
    /// Run it.
    Pass,
    /// Wait: a checkpoint is being taken or its verdict awaited.
    Wait,
    /// Report success without running it: the process is already gone (dumped).
    NoOp,
}

/// What the runtime's `create` of a container does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateAnswer {
    /// Create it as usual.
    Pass,
    /// Restore it from these images instead.
    Restore(PathBuf),
    /// Fail the create with this reason.
    Refuse(String),
    /// Wait until the state changes (the container is being dumped or handed over).
    Wait,
    /// Not decided by the state: a migration target asks for its checkpoint.
    Fetch,
}

/// A transition that is not allowed from the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container}: cannot {action} while {state}")]
pub struct InvalidTransition {
    /// The container.
    pub container: String,
    /// What was attempted.
    pub action: &'static str,
    /// The state it was in.
    pub state: String,
}

impl MoveState {
    /// Short name for logs, errors and `GET /migrations`.
    pub fn name(state: Option<&MoveState>) -> &'static str {
        match state {
            None => "idle",
            Some(MoveState::Checkpointing { .. }) => "checkpointing",
            Some(MoveState::HandedOver { .. }) => "handed over",
            Some(MoveState::MigratedAway { .. }) => "migrated away",
            Some(MoveState::RollingBack { .. }) => "rolling back",
            Some(MoveState::Armed { .. }) => "armed",
            Some(MoveState::Receiving { .. }) => "receiving",
            Some(MoveState::Restoring { .. }) => "restoring",
            Some(MoveState::Arrived) => "arrived",
            Some(MoveState::Abandoned { .. }) => "abandoned",
        }
    }

    /// The runtime's kill of a container in `state`.
    pub fn kill_answer(state: Option<&MoveState>) -> KillAnswer {
        match state {
            Some(MoveState::Checkpointing { .. } | MoveState::HandedOver { .. }) => {
                KillAnswer::Wait
            }
            Some(MoveState::MigratedAway { .. } | MoveState::RollingBack { .. }) => {
                KillAnswer::NoOp
            }
            _ => KillAnswer::Pass,
        }
    }

    /// The runtime's create of a container in `state`; `target` when the Pod is a
    /// migration target (it carries `podmig.dev/migrate-from`).
    pub fn create_answer(state: Option<&MoveState>, target: bool) -> CreateAnswer {
        match state {
            Some(MoveState::Checkpointing { .. } | MoveState::HandedOver { .. }) => {
                CreateAnswer::Wait
            }
            Some(MoveState::MigratedAway { target, .. }) => CreateAnswer::Refuse(format!(
                "the container was migrated away to {target}; it is not started again here"
            )),
            Some(MoveState::RollingBack { images, .. } | MoveState::Armed { images }) => {
                CreateAnswer::Restore(images.clone())
            }
            Some(MoveState::Receiving { .. } | MoveState::Restoring { .. }) => {
                CreateAnswer::Refuse("a restore of this container is already running".into())
            }
            Some(MoveState::Abandoned { reason }) => CreateAnswer::Refuse(reason.clone()),
            Some(MoveState::Arrived) => CreateAnswer::Pass,
            None if target => CreateAnswer::Fetch,
            None => CreateAnswer::Pass,
        }
    }

    /// True when a move of the container may begin.
    pub fn can_migrate(state: Option<&MoveState>) -> bool {
        matches!(state, None | Some(MoveState::Arrived))
    }
}

/// The move states of one Pod's containers, changed only through its transitions.
#[derive(Debug, Default)]
pub struct PodMoves {
    states: std::collections::BTreeMap<String, MoveState>,
}

impl PodMoves {
    /// The state of `container`.
    pub fn get(&self, container: &str) -> Option<&MoveState> {
        self.states.get(container)
    }

    /// Every container with a state.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &MoveState)> {
        self.states.iter()
    }

    fn invalid(&self, container: &str, action: &'static str) -> InvalidTransition {
        InvalidTransition {
            container: container.into(),
            action,
            state: MoveState::name(self.get(container)).into(),
        }
    }

    fn change(
        &mut self,
        container: &str,
        action: &'static str,
        allowed: impl Fn(Option<&MoveState>) -> bool,
        next: Option<MoveState>,
    ) -> Result<(), InvalidTransition> {
        if !allowed(self.get(container)) {
            return Err(self.invalid(container, action));
        }
        match next {
            Some(s) => self.states.insert(container.into(), s),
            None => self.states.remove(container),
        };
        Ok(())
    }

    /// Source: the freeze and dump begin.
    pub fn begin_checkpoint(
        &mut self,
        container: &str,
        migration: &str,
    ) -> Result<(), InvalidTransition> {
        self.change(
            container,
            "checkpoint",
            MoveState::can_migrate,
            Some(MoveState::Checkpointing {
                migration: migration.into(),
            }),
        )
    }

    /// Source: the dump failed or left the container running; it runs on as before.
    pub fn keep_running(&mut self, container: &str) -> Result<(), InvalidTransition> {
        self.change(
            container,
            "end a checkpoint",
            |s| matches!(s, Some(MoveState::Checkpointing { .. })),
            None,
        )
    }

    /// Source: dumped into `images`, handed to the target.
    pub fn handed_over(
        &mut self,
        container: &str,
        images: PathBuf,
        frozen_at: Instant,
    ) -> Result<(), InvalidTransition> {
        let migration = match self.get(container) {
            Some(MoveState::Checkpointing { migration }) => migration.clone(),
            _ => return Err(self.invalid(container, "hand over")),
        };
        self.states.insert(
            container.into(),
            MoveState::HandedOver {
                migration,
                images,
                frozen_at,
            },
        );
        Ok(())
    }

    /// The move and images of a handed-over container, or why `action` is not allowed.
    fn handed_over_parts(
        &self,
        container: &str,
        action: &'static str,
    ) -> Result<(String, PathBuf), InvalidTransition> {
        match self.get(container) {
            Some(MoveState::HandedOver {
                migration, images, ..
            }) => Ok((migration.clone(), images.clone())),
            _ => Err(self.invalid(container, action)),
        }
    }

    /// Source: the target runs; returns the images to delete.
    pub fn commit(&mut self, container: &str, target: &str) -> Result<PathBuf, InvalidTransition> {
        let (migration, images) = self.handed_over_parts(container, "commit")?;
        self.states.insert(
            container.into(),
            MoveState::MigratedAway {
                migration,
                target: target.into(),
            },
        );
        Ok(images)
    }

    /// Source, after a daemon restart: the journal says the container moved away.
    pub fn moved_away(
        &mut self,
        container: &str,
        migration: &str,
        target: &str,
    ) -> Result<(), InvalidTransition> {
        self.change(
            container,
            "mark moved away",
            |s| matches!(s, None | Some(MoveState::MigratedAway { .. })),
            Some(MoveState::MigratedAway {
                migration: migration.into(),
                target: target.into(),
            }),
        )
    }

    /// Source: the move failed after the freeze and the container, kept frozen, runs on
    /// where it stopped; returns the images to delete.
    pub fn resume(&mut self, container: &str) -> Result<PathBuf, InvalidTransition> {
        let (_, images) = self.handed_over_parts(container, "resume")?;
        self.states.remove(container);
        Ok(images)
    }

    /// Source: the move failed after the freeze and the container is gone (it could not
    /// be kept frozen); its next create resumes it from its images.
    pub fn roll_back(&mut self, container: &str) -> Result<(), InvalidTransition> {
        let (migration, images) = self.handed_over_parts(container, "roll back")?;
        self.states.insert(
            container.into(),
            MoveState::RollingBack { migration, images },
        );
        Ok(())
    }

    /// Target: a restore was armed explicitly.
    pub fn arm(&mut self, container: &str, images: PathBuf) -> Result<(), InvalidTransition> {
        self.change(
            container,
            "arm a restore",
            |s| matches!(s, None | Some(MoveState::Armed { .. } | MoveState::Arrived)),
            Some(MoveState::Armed { images }),
        )
    }

    /// Target: fetching the checkpoint begins.
    pub fn begin_receive(
        &mut self,
        container: &str,
        migration: &str,
    ) -> Result<(), InvalidTransition> {
        self.change(
            container,
            "receive",
            |s| s.is_none(),
            Some(MoveState::Receiving {
                migration: migration.into(),
            }),
        )
    }

    /// A restore from `images` begins (after receiving, from an armed checkpoint, or as a
    /// rollback).
    pub fn begin_restore(
        &mut self,
        container: &str,
        images: PathBuf,
    ) -> Result<(), InvalidTransition> {
        let (migration, rollback) = match self.get(container) {
            Some(MoveState::Receiving { migration }) => (migration.clone(), false),
            Some(MoveState::Armed { .. }) => (String::new(), false),
            Some(MoveState::RollingBack { migration, .. }) => (migration.clone(), true),
            _ => return Err(self.invalid(container, "restore")),
        };
        self.states.insert(
            container.into(),
            MoveState::Restoring {
                migration,
                images,
                rollback,
            },
        );
        Ok(())
    }

    /// The move failed on the target side: refuse the container from now on.
    pub fn abandon(&mut self, container: &str, reason: &str) -> Result<(), InvalidTransition> {
        self.change(
            container,
            "abandon",
            |s| {
                matches!(
                    s,
                    Some(
                        MoveState::Receiving { .. }
                            | MoveState::Restoring {
                                rollback: false,
                                ..
                            }
                    )
                )
            },
            Some(MoveState::Abandoned {
                reason: reason.into(),
            }),
        )
    }

    /// A restore ended. Success: a target has arrived, a rollback is back to normal.
    /// Failure of a rollback: its images stay for the next attempt.
    pub fn restored(&mut self, container: &str, ok: bool) -> Result<(), InvalidTransition> {
        let (migration, images, rollback) = match self.get(container) {
            Some(MoveState::Restoring {
                migration,
                images,
                rollback,
            }) => (migration.clone(), images.clone(), *rollback),
            _ => return Err(self.invalid(container, "finish a restore")),
        };
        let next = match (ok, rollback) {
            (true, true) => None,
            (true, false) => Some(MoveState::Arrived),
            (false, true) => Some(MoveState::RollingBack { migration, images }),
            (false, false) => Some(MoveState::Abandoned {
                reason: "the restore of the moved state failed".into(),
            }),
        };
        match next {
            Some(s) => self.states.insert(container.into(), s),
            None => self.states.remove(container),
        };
        Ok(())
    }

    /// The Pod is gone: every image directory this table still points at, to delete.
    pub fn drain_images(&mut self) -> Vec<PathBuf> {
        let out = self
            .states
            .values()
            .filter_map(|s| match s {
                MoveState::HandedOver { images, .. }
                | MoveState::RollingBack { images, .. }
                | MoveState::Armed { images }
                | MoveState::Restoring { images, .. } => Some(images.clone()),
                _ => None,
            })
            .collect();
        self.states.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successful_source_move_ends_migrated_away_and_refuses_restarts() {
        let mut m = PodMoves::default();
        m.begin_checkpoint("app", "m1").expect("begin");
        assert_eq!(MoveState::kill_answer(m.get("app")), KillAnswer::Wait);
        assert_eq!(
            MoveState::create_answer(m.get("app"), false),
            CreateAnswer::Wait
        );
        m.handed_over("app", "/i".into(), Instant::now())
            .expect("dumped");
        assert_eq!(MoveState::kill_answer(m.get("app")), KillAnswer::Wait);
        assert_eq!(
            m.commit("app", "ns/x-1 on n2").expect("commit"),
            PathBuf::from("/i")
        );
        assert_eq!(MoveState::kill_answer(m.get("app")), KillAnswer::NoOp);
        match MoveState::create_answer(m.get("app"), false) {
            CreateAnswer::Refuse(r) => assert!(r.contains("ns/x-1 on n2"), "{r}"),
            other => panic!("{other:?}"),
        }
        // No second move of a container that is gone.
        assert!(m.begin_checkpoint("app", "m2").is_err());
    }

    #[test]
    fn a_failed_move_rolls_back_through_a_restore_from_its_own_images() {
        let mut m = PodMoves::default();
        m.begin_checkpoint("app", "m1").expect("begin");
        m.handed_over("app", "/i".into(), Instant::now())
            .expect("dumped");
        m.roll_back("app").expect("rollback");
        assert_eq!(MoveState::kill_answer(m.get("app")), KillAnswer::NoOp);
        assert_eq!(
            MoveState::create_answer(m.get("app"), false),
            CreateAnswer::Restore("/i".into())
        );
        m.begin_restore("app", "/i".into()).expect("restore");
        m.restored("app", false).expect("failed once");
        assert!(matches!(m.get("app"), Some(MoveState::RollingBack { .. })));
        m.begin_restore("app", "/i".into()).expect("again");
        m.restored("app", true).expect("resumed");
        assert_eq!(m.get("app"), None);
        assert!(m.begin_checkpoint("app", "m2").is_ok(), "movable again");
    }

    #[test]
    fn a_frozen_source_resumes_in_place_after_a_failed_move() {
        let mut m = PodMoves::default();
        m.begin_checkpoint("app", "m1").expect("begin");
        assert!(m.resume("app").is_err(), "nothing dumped yet");
        m.handed_over("app", "/i".into(), Instant::now())
            .expect("dumped");
        assert_eq!(m.resume("app").expect("resume"), PathBuf::from("/i"));
        assert_eq!(m.get("app"), None);
        assert_eq!(MoveState::kill_answer(m.get("app")), KillAnswer::Pass);
    }

    #[test]
    fn inconsistent_transitions_are_refused() {
        let mut m = PodMoves::default();
        let e = m.commit("app", "x").expect_err("nothing to commit");
        assert_eq!(e.state, "idle");
        assert!(m.roll_back("app").is_err());
        assert!(m.begin_restore("app", "/i".into()).is_err());
        m.begin_checkpoint("app", "m1").expect("begin");
        assert!(
            m.begin_checkpoint("app", "m2").is_err(),
            "one move at a time"
        );
        assert!(m.begin_receive("app", "m3").is_err());
        m.keep_running("app").expect("failed dump");
        assert_eq!(m.get("app"), None);
    }

    #[test]
    fn a_target_fetches_restores_and_later_restarts_fresh_or_is_refused_after_failure() {
        let mut m = PodMoves::default();
        assert_eq!(MoveState::create_answer(None, true), CreateAnswer::Fetch);
        m.begin_receive("app", "m1").expect("receive");
        m.begin_restore("app", "/t".into()).expect("restore");
        m.restored("app", true).expect("ok");
        assert_eq!(
            MoveState::create_answer(m.get("app"), true),
            CreateAnswer::Pass
        );
        let mut f = PodMoves::default();
        f.begin_receive("app", "m1").expect("receive");
        f.abandon("app", "source refused: gone").expect("abandon");
        assert_eq!(
            MoveState::create_answer(f.get("app"), true),
            CreateAnswer::Refuse("source refused: gone".into())
        );
    }

    #[test]
    fn a_gone_pod_hands_back_every_image_directory() {
        let mut m = PodMoves::default();
        m.begin_checkpoint("a", "m").expect("a");
        m.handed_over("a", "/a".into(), Instant::now()).expect("a");
        m.roll_back("a").expect("a");
        m.arm("b", "/b".into()).expect("b");
        let mut imgs = m.drain_images();
        imgs.sort();
        assert_eq!(imgs, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(m.iter().count(), 0);
    }
}
