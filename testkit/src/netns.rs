//! Network namespaces made with `ip netns add` (files under /run/netns), and
//! entering one from a thread.
//!
//! setns(2) moves only the calling thread, and a socket keeps the namespace
//! it was created in, so code that must open sockets inside a namespace runs
//! on a thread of its own ([`in_netns`], [`spawn_in`]).

use std::fs::File;
use std::io;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::thread;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::cmd::{run, CmdError};

/// The file `ip netns add` creates for `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// `ip netns add name`.
pub fn add(name: &str) -> Result<(), CmdError> {
    run(&["ip", "netns", "add", name]).map(drop)
}

/// `ip netns del name`, best effort (cleanup paths call it).
pub fn del(name: &str) {
    let _ = run(&["ip", "netns", "del", name]);
}

/// `ip -n ns ARGS` with `args` split on whitespace: stdout, or the command
/// line and iproute2's complaint.
pub fn ip_in(ns: &str, args: &str) -> Result<String, CmdError> {
    let mut all = vec!["ip", "-n", ns];
    all.extend(args.split_whitespace());
    run(&all)
}

/// Names of all network namespaces (`ip netns list`); empty when `ip` fails.
pub fn list() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .map(|out| {
            out.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the processes in a namespace (`ip netns pids`); empty when `ip`
/// fails (the namespace is gone).
pub fn pids(ns: &str) -> Vec<u32> {
    run(&["ip", "netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Moves the calling thread (only it) into the network namespace `name`.
pub fn enter(name: &str) -> io::Result<()> {
    let path = path(name);
    let file = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("setns into {}: {e}", path.display()))
    })
}

/// Starts `f` on a new thread that first entered namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> thread::JoinHandle<io::Result<T>> {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}

/// Runs `f` to completion on a thread inside namespace `ns`, so sockets it
/// opens belong there. A panic in `f` becomes an error.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    join(spawn_in(ns, f))
}

/// The result of a [`spawn_in`] thread; its panic becomes an error.
pub fn join<T>(handle: thread::JoinHandle<io::Result<T>>) -> io::Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a thread inside a namespace panicked")))
}

/// A namespace this process created; deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add name` and its loopback up.
    pub fn create(name: &str) -> Result<Self, CmdError> {
        add(name)?;
        let ns = Self {
            name: name.to_string(),
        };
        ip_in(name, "link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        del(&self.name);
    }
}
