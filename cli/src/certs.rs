//! `llmos certs init DIR`: a development CA and certificates for the
//! internal plane (mutual TLS between coordinators and workers).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use llmos_tls::dev::{self, Holder};
use llmos_tls::Role;

#[derive(Subcommand, Clone)]
pub enum CertsCommand {
    /// Write DIR/ca.crt and ca.key, and per coordinator and worker a .crt
    /// and .key (keys readable by their owner only). Certificates name
    /// their role (DNS `coordinator.llmos` / `worker.llmos`), their id
    /// (URI `llmos://<role>/<id>`) and the --host names; with no ids, one
    /// certificate per role, shared.
    Init(InitArgs),
}

#[derive(Args, Clone)]
pub struct InitArgs {
    /// Directory to write to (created if missing).
    pub dir: PathBuf,
    /// Coordinator node ids, comma-separated (each gets coordinator-<id>).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub coordinators: Vec<String>,
    /// Worker ids, comma-separated (each gets worker-<id>). None: one
    /// `worker` certificate shared by every worker.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Host names and IP addresses the processes are reached at
    /// (repeatable; default 127.0.0.1 and localhost), written into every
    /// certificate made by this run: a certificate bound to an id may
    /// advertise only addresses on these hosts (all of them: to bind each
    /// process to its own host, issue its certificate from a CA of your
    /// own with only that host).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Write over an existing CA in DIR (every certificate it issued stops
    /// being trusted by processes given the new one).
    #[arg(long)]
    pub force: bool,
}

/// The holders `init` issues for: one per id, or one per role.
pub fn holders(coordinators: &[String], workers: &[String]) -> Vec<Holder> {
    let each = |role, ids: &[String]| -> Vec<Holder> {
        if ids.is_empty() {
            vec![Holder { role, id: None }]
        } else {
            ids.iter().map(|i| Holder::bound(role, i.clone())).collect()
        }
    };
    let mut h = each(Role::Coordinator, coordinators);
    h.extend(each(Role::Worker, workers));
    h
}

pub fn default_hosts() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

pub fn run(c: &CertsCommand) -> Result<()> {
    match c {
        CertsCommand::Init(a) => {
            let hosts = if a.hosts.is_empty() {
                default_hosts()
            } else {
                a.hosts.clone()
            };
            let ca = a.dir.join("ca.crt");
            if ca.exists() && !a.force {
                anyhow::bail!(
                    "{} exists: a new CA would stop every certificate it issued from being trusted; give --force to replace it, or another DIR",
                    ca.display()
                );
            }
            let hs = holders(&a.coordinators, &a.workers);
            dev::init(&a.dir, &hs, &hosts)?;
            println!("{}", a.dir.join("ca.crt").display());
            for h in &hs {
                let f = dev::files(&a.dir, h);
                println!(
                    "{}\t{}\t{}",
                    h.file_name(),
                    f.cert.display(),
                    f.key.display()
                );
            }
            eprintln!(
                "start each process with --tls-cert, --tls-key of its own and --tls-ca {}",
                a.dir.join("ca.crt").display()
            );
            Ok(())
        }
    }
}
