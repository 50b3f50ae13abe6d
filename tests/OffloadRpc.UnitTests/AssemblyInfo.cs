using Xunit;

// Connections spin on their rings; on a 2-core machine, test classes running connections in
// parallel would starve each other's peer processes. Run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
