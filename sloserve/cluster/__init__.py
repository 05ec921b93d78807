"""Several engine instances over Ray: colocated replicas, disaggregated prefill/decode, tropical."""
