//! The key rotation state machine, as pure code.
//!
//! ```text
//!            stage(next)             activate               destroy_old
//!   Idle ───────────────▶ Staged ───────────────▶ Activated ───────────────▶ Idle
//!    ▲  ▲                   │                        │
//!    │  └────── abort ──────┤                        │
//!    └──────── revoke(new) ─┴──────── revoke(new) ───┘   (from any state)
//! ```
//!
//! - **Idle**: one active key.
//! - **Staged**: the active key plus a generated next key that peers are asked to
//!   pre-accept (published as `next-public-key`). Traffic still uses the active key.
//! - **Activated**: the next key became the active one; the previous key is kept
//!   until peers have confirmed the switch, then destroyed (`destroy_old`).
//! - **abort** withdraws a staged key (Staged → Idle): the rotation is abandoned
//!   and the key that was never used is destroyed.
//! - **revoke** is the emergency path: every existing key is destroyed at once and a
//!   fresh key becomes active; peers drop the node until they see the new key.
//!
//! Every transition returns the new state and the audit events it implies; the
//! store performs the file writes and appends the events. Key material never passes
//! through here, only [`KeyMeta`].

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{Fingerprint, PublicKey};

/// What the state machine knows about one key: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    pub generation: u64,
    pub created: Timestamp,
    pub public_key: PublicKey,
    pub fingerprint: Fingerprint,
}

impl KeyMeta {
    pub fn new(generation: u64, created: Timestamp, public_key: PublicKey) -> Self {
        Self {
            generation,
            created,
            fingerprint: public_key.fingerprint(),
            public_key,
        }
    }
}

/// The keys a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The key traffic uses now.
    pub active: KeyMeta,
    /// Only in [`Phase::Staged`]: the key peers must pre-accept.
    pub staged: Option<KeyMeta>,
    /// Only in [`Phase::Activated`]: the key that was active before, kept until
    /// peers have confirmed the switch.
    pub previous: Option<KeyMeta>,
}

/// The rotation phase, derived from which keys a [`KeyState`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Idle,
    Staged,
    Activated,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Idle => "idle",
            Phase::Staged => "staged",
            Phase::Activated => "activated",
        })
    }
}

/// What a transition asks the store to record, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEvent {
    Generated(KeyMeta),
    Staged(KeyMeta),
    /// `old` was active, `new` is active now.
    Activated {
        old: KeyMeta,
        new: KeyMeta,
    },
    Destroyed(KeyMeta),
    /// `old` was revoked (it is destroyed by a following `Destroyed`).
    Revoked(KeyMeta),
    /// The previous key's grace period is over: it is no longer accepted (it
    /// is destroyed by a following `Destroyed`).
    GraceEnded(KeyMeta),
    /// The staged key was withdrawn before it was ever activated (it is
    /// destroyed by a following `Destroyed`).
    Aborted(KeyMeta),
}

/// The result of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub state: KeyState,
    pub events: Vec<KeyEvent>,
    /// Keys whose files must be destroyed (after the new state is committed).
    pub destroy: Vec<KeyMeta>,
}

/// Why a transition is not allowed from the current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("a rotation is already staged (next key {fingerprint}, generation {generation}); run `wgmesh keys rotate --activate` to switch to it")]
    AlreadyStaged {
        fingerprint: Fingerprint,
        generation: u64,
    },
    #[error("the previous key {fingerprint} (generation {generation}) has not been destroyed yet; run `wgmesh keys rotate --destroy-old` first")]
    PreviousNotDestroyed {
        fingerprint: Fingerprint,
        generation: u64,
    },
    #[error("no rotation is staged; run `wgmesh keys rotate --stage` first")]
    NothingStaged,
    #[error(
        "there is no previous key to destroy (phase is {0}); `--destroy-old` follows `--activate`"
    )]
    NoPreviousKey(Phase),
    #[error("the new key's generation {given} must be at least {expected} (greater than every generation used so far)")]
    BadGeneration { given: u64, expected: u64 },
    #[error("the new key is the same as an existing key ({0}); generate a fresh one")]
    KeyReused(Fingerprint),
}

impl KeyState {
    /// A node's first key.
    pub fn initial(first: KeyMeta) -> (Self, Vec<KeyEvent>) {
        let state = Self {
            active: first.clone(),
            staged: None,
            previous: None,
        };
        (state, vec![KeyEvent::Generated(first)])
    }

    pub fn phase(&self) -> Phase {
        match (&self.staged, &self.previous) {
            (Some(_), _) => Phase::Staged,
            (None, Some(_)) => Phase::Activated,
            (None, None) => Phase::Idle,
        }
    }

    /// The lowest generation the next generated key may carry: generations are
    /// never reused, so an audit record's generation names one key for ever.
    pub fn next_generation(&self) -> u64 {
        self.keys()
            .map(|k| k.generation)
            .max()
            .unwrap_or(0)
            .saturating_add(1)
    }

    /// Every key the state holds.
    pub fn keys(&self) -> impl Iterator<Item = &KeyMeta> {
        std::iter::once(&self.active)
            .chain(self.staged.as_ref())
            .chain(self.previous.as_ref())
    }

    /// Idle → Staged.
    pub fn stage(&self, next: KeyMeta) -> Result<Transition, RotationError> {
        match self.phase() {
            Phase::Staged => return Err(self.already_staged()),
            Phase::Activated => return Err(self.previous_not_destroyed()),
            Phase::Idle => {}
        }
        self.check_new(&next)?;
        let mut state = self.clone();
        state.staged = Some(next.clone());
        Ok(Transition {
            state,
            events: vec![KeyEvent::Generated(next.clone()), KeyEvent::Staged(next)],
            destroy: Vec::new(),
        })
    }

    /// Staged → Activated: the staged key becomes active, the old one is kept as
    /// `previous` until [`KeyState::destroy_old`].
    pub fn activate(&self) -> Result<Transition, RotationError> {
        let Some(next) = self.staged.clone() else {
            return Err(RotationError::NothingStaged);
        };
        let old = self.active.clone();
        let state = Self {
            active: next.clone(),
            staged: None,
            previous: Some(old.clone()),
        };
        Ok(Transition {
            state,
            events: vec![KeyEvent::Activated { old, new: next }],
            destroy: Vec::new(),
        })
    }

    /// Staged → Idle: the rotation is abandoned and the staged key, which
    /// never carried traffic, is destroyed. The active key stays.
    pub fn abort(&self) -> Result<Transition, RotationError> {
        let Some(staged) = self.staged.clone() else {
            return Err(RotationError::NothingStaged);
        };
        let mut state = self.clone();
        state.staged = None;
        Ok(Transition {
            state,
            events: vec![
                KeyEvent::Aborted(staged.clone()),
                KeyEvent::Destroyed(staged.clone()),
            ],
            destroy: vec![staged],
        })
    }

    /// Activated → Idle: the grace period of the previous key ends (it is no
    /// longer accepted) and it is destroyed.
    pub fn destroy_old(&self) -> Result<Transition, RotationError> {
        if self.staged.is_some() {
            return Err(RotationError::NoPreviousKey(self.phase()));
        }
        let Some(previous) = self.previous.clone() else {
            return Err(RotationError::NoPreviousKey(self.phase()));
        };
        let mut state = self.clone();
        state.previous = None;
        Ok(Transition {
            state,
            events: vec![
                KeyEvent::GraceEnded(previous.clone()),
                KeyEvent::Destroyed(previous.clone()),
            ],
            destroy: vec![previous],
        })
    }

    /// Any phase → Idle with `fresh` active: the emergency path. The active key is
    /// revoked, and every key the node held is destroyed.
    pub fn revoke(&self, fresh: KeyMeta) -> Result<Transition, RotationError> {
        self.check_new(&fresh)?;
        let mut events = vec![
            KeyEvent::Revoked(self.active.clone()),
            KeyEvent::Generated(fresh.clone()),
            KeyEvent::Activated {
                old: self.active.clone(),
                new: fresh.clone(),
            },
        ];
        let destroy: Vec<KeyMeta> = self.keys().cloned().collect();
        events.extend(destroy.iter().cloned().map(KeyEvent::Destroyed));
        Ok(Transition {
            state: Self {
                active: fresh,
                staged: None,
                previous: None,
            },
            events,
            destroy,
        })
    }

    fn check_new(&self, new: &KeyMeta) -> Result<(), RotationError> {
        // At least, not exactly: the store also skips generations that only its
        // audit log remembers (a key generated by an operation that was then
        // aborted), so that a generation names one key for ever.
        let expected = self.next_generation();
        if new.generation < expected {
            return Err(RotationError::BadGeneration {
                given: new.generation,
                expected,
            });
        }
        if self.keys().any(|k| k.public_key == new.public_key) {
            return Err(RotationError::KeyReused(new.fingerprint));
        }
        Ok(())
    }

    fn already_staged(&self) -> RotationError {
        let staged = self.staged.as_ref().unwrap_or(&self.active);
        RotationError::AlreadyStaged {
            fingerprint: staged.fingerprint,
            generation: staged.generation,
        }
    }

    fn previous_not_destroyed(&self) -> RotationError {
        let previous = self.previous.as_ref().unwrap_or(&self.active);
        RotationError::PreviousNotDestroyed {
            fingerprint: previous.fingerprint,
            generation: previous.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn meta(generation: u64) -> KeyMeta {
        KeyMeta::new(
            generation,
            Timestamp::from_second(1_700_000_000 + generation as i64).unwrap(),
            PrivateKey::generate().public_key(),
        )
    }

    #[test]
    fn full_rotation_walks_idle_staged_activated_idle() {
        let (s0, ev) = KeyState::initial(meta(1));
        assert_eq!(ev.len(), 1);
        assert_eq!(s0.phase(), Phase::Idle);

        let next = meta(2);
        let t1 = s0.stage(next.clone()).unwrap();
        assert_eq!(t1.state.phase(), Phase::Staged);
        assert_eq!(
            t1.state.active, s0.active,
            "staging must not change traffic"
        );
        assert_eq!(
            t1.events,
            vec![
                KeyEvent::Generated(next.clone()),
                KeyEvent::Staged(next.clone())
            ]
        );

        let t2 = t1.state.activate().unwrap();
        assert_eq!(t2.state.phase(), Phase::Activated);
        assert_eq!(t2.state.active, next);
        assert_eq!(t2.state.previous.as_ref(), Some(&s0.active));
        assert!(t2.destroy.is_empty(), "old key kept until peers confirm");

        let t3 = t2.state.destroy_old().unwrap();
        assert_eq!(t3.state.phase(), Phase::Idle);
        assert_eq!(t3.destroy, vec![s0.active.clone()]);
        assert_eq!(
            t3.events,
            vec![
                KeyEvent::GraceEnded(s0.active.clone()),
                KeyEvent::Destroyed(s0.active.clone())
            ]
        );
        assert_eq!(t3.state.next_generation(), 3);
    }

    #[test]
    fn out_of_order_steps_are_refused_with_the_next_step_named() {
        let (idle, _) = KeyState::initial(meta(1));
        assert_eq!(idle.activate(), Err(RotationError::NothingStaged));
        assert_eq!(
            idle.destroy_old(),
            Err(RotationError::NoPreviousKey(Phase::Idle))
        );

        let staged = idle.stage(meta(2)).unwrap().state;
        let err = staged.stage(meta(3)).unwrap_err();
        assert!(err.to_string().contains("--activate"), "{err}");
        assert!(staged.destroy_old().is_err());

        let activated = staged.activate().unwrap().state;
        let err = activated.stage(meta(3)).unwrap_err();
        assert!(err.to_string().contains("--destroy-old"), "{err}");
        assert_eq!(activated.activate(), Err(RotationError::NothingStaged));
    }

    #[test]
    fn generations_are_never_reused() {
        let (idle, _) = KeyState::initial(meta(1));
        assert_eq!(
            idle.stage(meta(1)),
            Err(RotationError::BadGeneration {
                given: 1,
                expected: 2
            })
        );
        let staged = idle.stage(meta(2)).unwrap().state;
        // Revoking while staged: the staged generation is burnt too.
        let revoked = staged.revoke(meta(3)).unwrap();
        assert_eq!(revoked.state.active.generation, 3);
    }

    #[test]
    fn a_key_cannot_be_staged_twice() {
        let (idle, _) = KeyState::initial(meta(1));
        let mut again = idle.active.clone();
        again.generation = 2;
        assert_eq!(
            idle.stage(again.clone()),
            Err(RotationError::KeyReused(again.fingerprint))
        );
    }

    #[test]
    fn abort_withdraws_only_a_staged_key() {
        let (idle, _) = KeyState::initial(meta(1));
        assert_eq!(idle.abort(), Err(RotationError::NothingStaged));
        let next = meta(2);
        let staged = idle.stage(next.clone()).unwrap().state;
        let t = staged.abort().unwrap();
        assert_eq!(t.state, idle, "back to the keys from before the stage");
        assert_eq!(
            t.events,
            vec![
                KeyEvent::Aborted(next.clone()),
                KeyEvent::Destroyed(next.clone())
            ]
        );
        assert_eq!(t.destroy, vec![next]);
        // The state alone no longer names generation 2; the store still never
        // reuses it, because its log does (see the store's tests).
        assert_eq!(t.state.next_generation(), 2);
        let activated = staged.activate().unwrap().state;
        assert_eq!(activated.abort(), Err(RotationError::NothingStaged));
    }

    #[test]
    fn revoke_destroys_every_key_from_any_phase() {
        let (idle, _) = KeyState::initial(meta(1));
        let staged = idle.stage(meta(2)).unwrap().state;
        let activated = staged.activate().unwrap().state;
        for state in [&idle, &staged, &activated] {
            let fresh = meta(state.next_generation());
            let t = state.revoke(fresh.clone()).unwrap();
            assert_eq!(t.state.phase(), Phase::Idle);
            assert_eq!(t.state.active, fresh);
            let held: Vec<KeyMeta> = state.keys().cloned().collect();
            assert_eq!(t.destroy, held);
            assert_eq!(t.events[0], KeyEvent::Revoked(state.active.clone()));
            let destroyed = t
                .events
                .iter()
                .filter(|e| matches!(e, KeyEvent::Destroyed(_)))
                .count();
            assert_eq!(destroyed, held.len());
        }
    }
}
