mod api;
mod cli;
mod config;
#[cfg(feature = "failpoints")]
mod crash;
mod dry_run;
mod email;
mod file_sink;
mod protocol;
mod secrets;
