mod api;
mod cli;
mod config;
#[cfg(feature = "failpoints")]
mod crash;
mod dry_run;
mod file_sink;
mod protocol;
mod secrets;
