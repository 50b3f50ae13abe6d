using OffloadRpc.Fuzz;
using Xunit;
using Xunit.Abstractions;

namespace OffloadRpc.Tests;

[CollectionDefinition(nameof(FuzzSmokeCollection), DisableParallelization = true)]
public sealed class FuzzSmokeCollection
{
}

/// <summary>
/// The fuzzer's smoke run (tests/OffloadRpc.Fuzz): every seed of the checked-in corpus and a few
/// thousand deterministic mutations of them go through every parser of peer input (handshake, socket
/// frames, ring slots and payload references, release handles, pipeline headers, generated stubs and
/// reply decoders, the gRPC transport's frames and message assembly), each bounded in time; none may
/// fail otherwise than as documented, and the descriptors they opened are all closed again. Alone in
/// its collection, so the descriptor count is its own.
/// </summary>
[Collection(nameof(FuzzSmokeCollection))]
public sealed class FuzzSmokeTests
{
    private readonly ITestOutputHelper _output;

    public FuzzSmokeTests(ITestOutputHelper output) => _output = output;

    [Fact]
    public void Every_seed_and_thousands_of_mutations_meet_only_documented_failures()
    {
        string corpus = FuzzProgram.DefaultCorpus();
        Assert.True(Directory.Exists(corpus), $"the seed corpus is at {corpus}");
        int descriptors = OpenDescriptors();

        var log = new StringWriter();
        IReadOnlyList<string> failures = SmokeRun.Run(corpus, mutationsPerTarget: 600, seed: 12, log);
        _output.WriteLine(log.ToString());
        Assert.Empty(failures);

        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.True(OpenDescriptors() <= descriptors + 32, $"descriptors before the run: {descriptors}, after: {OpenDescriptors()}");
    }

    private static int OpenDescriptors() => Directory.GetFiles("/proc/self/fd").Length;
}
