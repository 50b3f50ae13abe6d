using OffloadRpc.Fuzz;
using OffloadRpc.Fuzz.Targets;
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

    /// <summary>
    /// The checked-in seeds are what <c>generate</c> writes today: a seed names a method by its index in the
    /// contracts and carries their hashes, so a contract that changes without a regeneration leaves seeds that
    /// still run but aim at a neighbouring method or a mismatched contract.
    /// </summary>
    [Fact]
    public void The_checked_in_seeds_are_what_generate_writes_from_the_contracts_of_today()
    {
        string corpus = FuzzProgram.DefaultCorpus();
        var stale = new List<string>();
        foreach (FuzzTarget target in FuzzTarget.All)
        {
            string folder = Path.Combine(corpus, target.Name);
            var made = new Dictionary<string, byte[]>();
            foreach ((string name, byte[] data) in target.Seeds())
            {
                made["seed-" + name] = data;
            }

            foreach ((string file, byte[] data) in made)
            {
                string path = Path.Combine(folder, file);
                if (!File.Exists(path))
                {
                    stale.Add($"{target.Name}/{file} is missing");
                }
                else if (!File.ReadAllBytes(path).AsSpan().SequenceEqual(data))
                {
                    stale.Add($"{target.Name}/{file} differs");
                }
            }

            stale.AddRange(Directory.GetFiles(folder, "seed-*").Select(Path.GetFileName).Where(file => !made.ContainsKey(file!)).Select(file => $"{target.Name}/{file} is no seed any more"));
        }

        Assert.True(stale.Count == 0, "run `dotnet run --project tests/OffloadRpc.Fuzz -- generate` and commit the seeds: " + string.Join("; ", stale));
    }

    private static int OpenDescriptors() => Directory.GetFiles("/proc/self/fd").Length;
}
