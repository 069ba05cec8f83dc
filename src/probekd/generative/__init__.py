"""The generative track: free-form problems graded by their final answer, sampled rollouts and pass rates."""
