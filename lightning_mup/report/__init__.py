"""Reading run folders across widths and seeds: averages, fits and figures."""
