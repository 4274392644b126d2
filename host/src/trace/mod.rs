//! Run timelines: recording, Chrome/Perfetto export and the staircase SVG chart.
