"""Parts of the robot methods: the foundation policy, its encoders and the adapters around its layers."""
