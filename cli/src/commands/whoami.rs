//! `gpuwasm whoami`: which tenant a token acts for.

use crate::args::ServerArgs;
use anyhow::Result;
use bytes::Bytes;
use gpuwasm_server::api::WhoAmI;
use http::Method;
use std::process::ExitCode;

/// `gpuwasm whoami`: the tenant a token acts for.
pub async fn run(server: ServerArgs) -> Result<ExitCode> {
    let me: WhoAmI = server.api()?.admin(Method::GET, "whoami", Bytes::new()).await?;
    println!("tenant {} (token {}{})", me.tenant, me.token_id, if me.admin { ", admin" } else { "" });
    Ok(ExitCode::SUCCESS)
}
