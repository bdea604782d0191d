"""Everything that spans ranks: Comm (every collective, counted), the row-sharded item table and its placement, band mining, the band loss, per-rank saved directories."""
