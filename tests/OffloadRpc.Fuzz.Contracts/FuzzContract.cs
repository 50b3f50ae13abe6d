using MessagePack;

namespace OffloadRpc.Fuzz;

/// <summary>A struct that decodes from one byte (an empty array) into 32: the amplification the decode bound must keep in proportion.</summary>
[MessagePackObject]
public struct Sample
{
    [Key(0)]
    public int X;

    [Key(1)]
    public int Y;

    [Key(2)]
    public double Weight;

    [Key(3)]
    public long Tick;

    [Key(4)]
    public string? Tag;
}

/// <summary>Nested, recursive and keyed by strings: every shape of MessagePack argument a contract may have.</summary>
[MessagePackObject]
public sealed class Node
{
    [Key(0)]
    public string? Name { get; set; }

    [Key(1)]
    public Sample[] Samples { get; set; } = [];

    [Key(2)]
    public List<Node>? Children { get; set; }

    [Key(3)]
    public Dictionary<string, int[]>? Tags { get; set; }
}

/// <summary>The contract whose generated stub and proxy the fuzzer decodes with (besides the test contracts).</summary>
[OffloadService]
public interface IFuzzContract
{
    ValueTask<int> CountSamplesAsync(Sample[] samples, CancellationToken ct = default);

    ValueTask<int> CountWordsAsync(string[] words, List<string?> more);

    ValueTask<Node> EchoNodeAsync(Node node);

    ValueTask<long> MixedAsync(int a, string? text, ReadOnlyMemory<byte> data, byte[] copy, Node[]? nodes, Dictionary<string, Sample[]> map);

    ValueTask<Sample[]> MakeSamplesAsync(int count);

    ValueTask<Dictionary<string, Node>> IndexAsync(List<Node> nodes);

    ValueTask<ReadOnlyMemory<int>> SliceAsync(ReadOnlyMemory<int> values, int start);
}
