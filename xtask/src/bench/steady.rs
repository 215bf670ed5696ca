//! Steady-state overhead: direct vs through Shepherd vs through HAProxy.
use super::report::Section;
use anyhow::Result;

pub fn run(_quick: bool) -> Result<Section> {
    anyhow::bail!("not yet")
}
