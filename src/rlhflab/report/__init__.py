"""The self-contained HTML report (inline SVG plots, no network)."""
