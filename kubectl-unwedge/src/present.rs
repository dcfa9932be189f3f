//! What the plugin shows, as pure functions of the objects it read: the wedge list with queue
//! positions, the incident timeline, and the budget table. No I/O here, so every rule is a
//! unit test away.

mod budget;
mod data;
mod list;
mod table;
#[cfg(test)]
mod tests;
mod timeline;
mod watch;

pub use budget::{BUDGET_HEADERS, budget_cells, budget_rows};
pub use data::{DataFormat, ListFormat, list_object, render_data, render_watch_item, shown};
pub use list::{list_headers, phase_of, policy_of, rows};
pub use table::{Columns, human_duration, render_table};
pub use timeline::{render_timeline, timeline};
pub use watch::{Change, Watch};
