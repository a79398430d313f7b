"""Start-time replacements for standard-library pieces (records, logging); no project knowledge."""
