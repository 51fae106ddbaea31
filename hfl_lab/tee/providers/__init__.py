"""Evidence providers: configfs-tsm, the CoCo attestation agent, and the simulated TD."""
