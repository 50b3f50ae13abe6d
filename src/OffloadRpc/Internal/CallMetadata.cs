using System.Buffers;
using MessagePack;

namespace OffloadRpc.Internal;

/// <summary>
/// The metadata block of a request (<see cref="Transport.MessageFlags.HasMetadata"/>): the body starts with
/// a little-endian u32 length and this block, a MessagePack array of
/// [deadline: nil | remaining microseconds (int64), traceparent: nil | str, tracestate: nil | str,
/// headers: nil | map of str to str]. A reader skips elements it does not know (later versions may add some).
/// </summary>
internal sealed class CallMetadata
{
    /// <summary>The most headers one call may carry; more is the peer's protocol violation.</summary>
    public const int MaxHeaders = 256;

    /// <summary>A deadline further away than this is read as this far (ten years: a date any clock can add).</summary>
    public static readonly TimeSpan MaxDeadline = TimeSpan.FromDays(3650);

    /// <summary>The longest delay a token's timer takes; a deadline further away arms none (it would not fire in practice).</summary>
    public static readonly TimeSpan MaxTimerDelay = TimeSpan.FromMilliseconds(int.MaxValue - 1);

    private static readonly IReadOnlyDictionary<string, string> s_noHeaders = new Dictionary<string, string>(0);

    public static IReadOnlyDictionary<string, string> NoHeaders => s_noHeaders;

    public IReadOnlyDictionary<string, string> Headers { get; private init; } = s_noHeaders;

    /// <summary>Time left until the caller's deadline when it sent the call; null: no deadline.</summary>
    public TimeSpan? DeadlineRemaining { get; private init; }

    public string? TraceParent { get; private init; }

    public string? TraceState { get; private init; }

    public static void Encode(IBufferWriter<byte> destination, IReadOnlyDictionary<string, string>? headers, TimeSpan? deadlineRemaining, string? traceParent, string? traceState)
    {
        var writer = new MessagePackWriter(destination);
        writer.WriteArrayHeader(4);
        if (deadlineRemaining is { } remaining)
        {
            writer.Write(Math.Max(0L, (long)(remaining.Ticks / TimeSpan.TicksPerMicrosecond)));
        }
        else
        {
            writer.WriteNil();
        }

        writer.Write(traceParent);
        writer.Write(traceState);
        if (headers is null || headers.Count == 0)
        {
            writer.WriteNil();
        }
        else
        {
            writer.WriteMapHeader(headers.Count);
            foreach (KeyValuePair<string, string> header in headers)
            {
                writer.Write(header.Key);
                writer.Write(header.Value);
            }
        }

        writer.Flush();
    }

    /// <exception cref="ProtocolViolationException">The block does not decode.</exception>
    public static CallMetadata Decode(ReadOnlyMemory<byte> block)
    {
        try
        {
            var reader = new MessagePackReader(block);
            int count = reader.ReadArrayHeader();
            if (count < 4)
            {
                throw new ProtocolViolationException($"A metadata block of {count} elements (at least 4).");
            }

            TimeSpan? deadline = null;
            if (!reader.TryReadNil())
            {
                long micros = reader.ReadInt64();
                deadline = TimeSpan.FromTicks(Math.Clamp(micros, 0, MaxDeadline.Ticks / TimeSpan.TicksPerMicrosecond) * TimeSpan.TicksPerMicrosecond);
            }

            string? traceParent = reader.ReadString();
            string? traceState = reader.ReadString();
            IReadOnlyDictionary<string, string> headers = s_noHeaders;
            if (!reader.TryReadNil())
            {
                int headerCount = reader.ReadMapHeader();
                if (headerCount > MaxHeaders)
                {
                    throw new ProtocolViolationException($"A call with {headerCount} headers (limit {MaxHeaders}).");
                }

                var map = new Dictionary<string, string>(headerCount, StringComparer.Ordinal);
                for (int i = 0; i < headerCount; i++)
                {
                    string key = reader.ReadString() ?? throw new ProtocolViolationException("A header without a name.");
                    map[key] = reader.ReadString() ?? string.Empty;
                }

                headers = map;
            }

            for (int i = 4; i < count; i++)
            {
                reader.Skip();
            }

            return new CallMetadata { Headers = headers, DeadlineRemaining = deadline, TraceParent = traceParent, TraceState = traceState };
        }
        catch (ProtocolViolationException)
        {
            throw;
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            throw new ProtocolViolationException("A call's metadata block does not decode: " + ex.Message, ex);
        }
    }
}
