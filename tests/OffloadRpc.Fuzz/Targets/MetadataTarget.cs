using System.Buffers;
using OffloadRpc.Internal;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// The metadata block of a request (<see cref="CallMetadata"/>: headers, deadline, W3C trace context),
/// which a server decodes from any client that flags a request with it. Input: the block itself.
/// Every input either decodes, or fails with <see cref="ProtocolViolationException"/>; what decodes
/// has at most <see cref="CallMetadata.MaxHeaders"/> headers and a deadline within <see cref="CallMetadata.MaxDeadline"/>.
/// </summary>
internal sealed class MetadataTarget : FuzzTarget
{
    public override string Name => "metadata";

    public override string Description => "a request's metadata block: headers, deadline, trace context";

    public override void Run(ReadOnlySpan<byte> input)
    {
        CallMetadata decoded;
        try
        {
            decoded = CallMetadata.Decode(input.ToArray());
        }
        catch (ProtocolViolationException)
        {
            return;
        }

        if (decoded.Headers.Count > CallMetadata.MaxHeaders)
        {
            throw new FuzzFailure($"{decoded.Headers.Count} headers decoded past the limit of {CallMetadata.MaxHeaders}.");
        }

        if (decoded.DeadlineRemaining is { } remaining && (remaining < TimeSpan.Zero || remaining > CallMetadata.MaxDeadline))
        {
            throw new FuzzFailure($"a deadline of {remaining} decoded outside [0, {CallMetadata.MaxDeadline}].");
        }
    }

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        yield return ("empty", Encode(null, null, null, null));
        yield return ("headers", Encode(new Dictionary<string, string> { ["tenant"] = "acme", ["ünïcode"] = "välue" }, null, null, null));
        yield return ("deadline", Encode(null, TimeSpan.FromMilliseconds(250), null, null));
        yield return ("trace", Encode(null, null, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=value"));
        yield return ("all", Encode(new Dictionary<string, string> { ["a"] = "1" }, TimeSpan.FromSeconds(3), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", null));
    }

    private static byte[] Encode(IReadOnlyDictionary<string, string>? headers, TimeSpan? deadline, string? traceParent, string? traceState)
    {
        var block = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(block, headers, deadline, traceParent, traceState);
        return block.WrittenSpan.ToArray();
    }
}
