mod api;
mod cli;
mod config;
mod convergence;
#[cfg(feature = "failpoints")]
mod crash;
mod daemon;
mod dry_run;
mod email;
mod exec_sink;
mod file_sink;
mod fuzz_corpus;
mod hardening;
mod mail_server;
mod planner;
mod protocol;
mod secrets;
mod systemd;
