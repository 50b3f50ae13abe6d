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

    /// <summary>A deadline as UTC: a local time converted, an unspecified one read as UTC (as it always was: the deadline is compared with UtcNow).</summary>
    public static DateTime ToUtc(DateTime deadline) => deadline.Kind switch
    {
        DateTimeKind.Local => deadline.ToUniversalTime(),
        DateTimeKind.Unspecified => DateTime.SpecifyKind(deadline, DateTimeKind.Utc),
        _ => deadline,
    };

    /// <summary>The longest delay a token's timer takes; a deadline further away arms none (it would not fire in practice).</summary>
    public static readonly TimeSpan MaxTimerDelay = TimeSpan.FromMilliseconds(int.MaxValue - 1);

    private static readonly IReadOnlyDictionary<string, string> s_noHeaders = new Dictionary<string, string>(0);

    public static IReadOnlyDictionary<string, string> NoHeaders => s_noHeaders;

    public IReadOnlyDictionary<string, string> Headers { get; private init; } = s_noHeaders;

    /// <summary>Time left until the caller's deadline when it sent the call; null: no deadline.</summary>
    public TimeSpan? DeadlineRemaining { get; private init; }

    /// <summary>The caller's traceparent (text made from <see cref="TraceContext"/> when it was read as one).</summary>
    public string? TraceParent => _traceParent ?? (TraceContext is { } context ? $"00-{context.TraceId.ToHexString()}-{context.SpanId.ToHexString()}-{(byte)context.TraceFlags:x2}" : null);

    /// <summary>
    /// The caller's W3C trace context, read from a version-00 traceparent without making its text; null when
    /// none was sent or it has another form (then <see cref="TraceParent"/> has the text as sent).
    /// </summary>
    public System.Diagnostics.ActivityContext? TraceContext { get; private init; }

    private string? _traceParent;

    public string? TraceState { get; private init; }

    public static void Encode(IBufferWriter<byte> destination, IReadOnlyDictionary<string, string>? headers, TimeSpan? deadlineRemaining, string? traceParent, string? traceState)
    {
        var writer = new MessagePackWriter(destination);
        WriteDeadline(ref writer, deadlineRemaining);
        writer.Write(traceParent);
        writer.Write(traceState);
        WriteHeaders(ref writer, headers);
        writer.Flush();
    }

    /// <summary>
    /// The block with the W3C trace context of <paramref name="trace"/> (null: none): its traceparent is written
    /// from the span's trace and span ids, the same text as <see cref="System.Diagnostics.Activity.Id"/> without making that string.
    /// </summary>
    public static void Encode(IBufferWriter<byte> destination, IReadOnlyDictionary<string, string>? headers, TimeSpan? deadlineRemaining, System.Diagnostics.Activity? trace)
    {
        var writer = new MessagePackWriter(destination);
        WriteDeadline(ref writer, deadlineRemaining);
        if (trace is null)
        {
            writer.WriteNil();
            writer.WriteNil();
        }
        else
        {
            writer.WriteStringHeader(TraceParentLength);
            FormatTraceParent(trace, writer.GetSpan(TraceParentLength));
            writer.Advance(TraceParentLength);
            writer.Write(trace.TraceStateString);
        }

        WriteHeaders(ref writer, headers);
        writer.Flush();
    }

    /// <summary>"00-" 32 hex digits of the trace id "-" 16 of the span id "-" 2 of the flags.</summary>
    private const int TraceParentLength = 55;

    private static void FormatTraceParent(System.Diagnostics.Activity trace, Span<byte> destination)
    {
        "00-"u8.CopyTo(destination);
        System.Text.Encoding.ASCII.GetBytes(trace.TraceId.ToHexString(), destination.Slice(3, 32));
        destination[35] = (byte)'-';
        System.Text.Encoding.ASCII.GetBytes(trace.SpanId.ToHexString(), destination.Slice(36, 16));
        destination[52] = (byte)'-';
        destination[53] = (byte)'0';
        destination[54] = (trace.ActivityTraceFlags & System.Diagnostics.ActivityTraceFlags.Recorded) != 0 ? (byte)'1' : (byte)'0';
    }

    private static readonly SearchValues<byte> LowerHexDigits = SearchValues.Create("0123456789abcdef"u8);

    /// <summary>A version-00 traceparent, "00-" 32 lowercase hex "-" 16 lowercase hex "-" 2 lowercase hex, ids not all zero.</summary>
    private static bool TryParseTraceParent(ReadOnlySpan<byte> text, out System.Diagnostics.ActivityTraceId traceId, out System.Diagnostics.ActivitySpanId spanId, out byte flags)
    {
        traceId = default;
        spanId = default;
        flags = 0;
        if (text.Length != TraceParentLength || !text.StartsWith("00-"u8) || text[35] != '-' || text[52] != '-'
            || !IsLowerHex(text.Slice(3, 32)) || !IsLowerHex(text.Slice(36, 16)) || !IsLowerHex(text.Slice(53, 2))
            || !text.Slice(3, 32).ContainsAnyExcept((byte)'0') || !text.Slice(36, 16).ContainsAnyExcept((byte)'0'))
        {
            return false;
        }

        traceId = System.Diagnostics.ActivityTraceId.CreateFromUtf8String(text.Slice(3, 32));
        spanId = System.Diagnostics.ActivitySpanId.CreateFromUtf8String(text.Slice(36, 16));
        flags = (byte)((HexValue(text[53]) << 4) | HexValue(text[54]));
        return true;

        static bool IsLowerHex(ReadOnlySpan<byte> digits) => !digits.ContainsAnyExcept(LowerHexDigits);

        static int HexValue(byte digit) => digit <= '9' ? digit - '0' : digit - 'a' + 10;
    }

    private static void WriteDeadline(ref MessagePackWriter writer, TimeSpan? deadlineRemaining)
    {
        writer.WriteArrayHeader(4);
        if (deadlineRemaining is { } remaining)
        {
            writer.Write(Math.Max(0L, (long)(remaining.Ticks / TimeSpan.TicksPerMicrosecond)));
        }
        else
        {
            writer.WriteNil();
        }
    }

    private static void WriteHeaders(ref MessagePackWriter writer, IReadOnlyDictionary<string, string>? headers)
    {
        if (headers is null || headers.Count == 0)
        {
            writer.WriteNil();
            return;
        }

        writer.WriteMapHeader(headers.Count);
        if (headers is Dictionary<string, string> dictionary)
        {
            foreach (KeyValuePair<string, string> header in dictionary) // the struct enumerator: no box per call
            {
                writer.Write(header.Key);
                writer.Write(header.Value);
            }
        }
        else
        {
            foreach (KeyValuePair<string, string> header in headers)
            {
                writer.Write(header.Key);
                writer.Write(header.Value);
            }
        }
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

            string? traceParent = null;
            bool parsed = false;
            System.Diagnostics.ActivityTraceId traceId = default;
            System.Diagnostics.ActivitySpanId spanId = default;
            byte flags = 0;
            MessagePackReader peek = reader.CreatePeekReader();
            if (!peek.IsNil && peek.TryReadStringSpan(out ReadOnlySpan<byte> text) && TryParseTraceParent(text, out traceId, out spanId, out flags))
            {
                reader = peek;
                parsed = true;
            }
            else
            {
                traceParent = reader.ReadString();
            }

            string? traceState = reader.ReadString();
            IReadOnlyDictionary<string, string> headers = s_noHeaders;
            if (!reader.TryReadNil())
            {
                int headerCount = reader.ReadMapHeader();
                if (headerCount > MaxHeaders)
                {
                    throw new ProtocolViolationException($"A call with {headerCount} headers (limit {MaxHeaders}).");
                }

                if (headerCount <= ReceivedHeaders.MaxCount)
                {
                    var entries = new KeyValuePair<string, string>[headerCount];
                    int distinct = 0;
                    for (int i = 0; i < headerCount; i++)
                    {
                        (string key, string value) = ReadHeader(ref reader);
                        distinct = ReceivedHeaders.Set(entries, distinct, key, value);
                    }

                    headers = new ReceivedHeaders(entries, distinct);
                }
                else
                {
                    var map = new Dictionary<string, string>(headerCount, StringComparer.Ordinal);
                    for (int i = 0; i < headerCount; i++)
                    {
                        (string key, string value) = ReadHeader(ref reader);
                        map[key] = value; // a name sent twice keeps its last value, as in ReceivedHeaders
                    }

                    headers = map;
                }
            }

            for (int i = 4; i < count; i++)
            {
                reader.Skip();
            }

            return new CallMetadata
            {
                Headers = headers,
                DeadlineRemaining = deadline,
                _traceParent = traceParent,
                TraceContext = parsed ? new System.Diagnostics.ActivityContext(traceId, spanId, (System.Diagnostics.ActivityTraceFlags)flags, traceState, isRemote: true) : null,
                TraceState = traceState,
            };
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

    /// <summary>One header of the block's map: a name (never nil) and its value (nil reads as empty).</summary>
    private static (string Key, string Value) ReadHeader(ref MessagePackReader reader)
    {
        string key = reader.ReadString() ?? throw new ProtocolViolationException("A header without a name.");
        return (key, reader.ReadString() ?? string.Empty);
    }
}

/// <summary>
/// The headers a server received, when they are few (the usual case): one array searched in order instead
/// of a dictionary's three objects and hashing. Read-only, names compared ordinally; a name sent twice keeps its last value.
/// </summary>
internal sealed class ReceivedHeaders(KeyValuePair<string, string>[] entries, int count) : IReadOnlyDictionary<string, string>
{
    /// <summary>Up to this many headers; more go into a Dictionary.</summary>
    public const int MaxCount = 8;

    public int Count => count;

    public string this[string key] => TryGetValue(key, out string? value) ? value : throw new KeyNotFoundException($"The call has no header '{key}'.");

    public IEnumerable<string> Keys => this.Select(static entry => entry.Key);

    public IEnumerable<string> Values => this.Select(static entry => entry.Value);

    /// <summary>Sets <paramref name="key"/> among the first <paramref name="count"/> entries (replacing its value, or adding it); returns the new count.</summary>
    public static int Set(KeyValuePair<string, string>[] entries, int count, string key, string value)
    {
        int index = IndexOf(entries, count, key);
        entries[index < 0 ? count : index] = new KeyValuePair<string, string>(key, value);
        return index < 0 ? count + 1 : count;
    }

    public bool ContainsKey(string key) => IndexOf(entries, count, key) >= 0;

    public bool TryGetValue(string key, [System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out string value)
    {
        int index = IndexOf(entries, count, key);
        value = index < 0 ? null : entries[index].Value;
        return index >= 0;
    }

    public IEnumerator<KeyValuePair<string, string>> GetEnumerator()
    {
        for (int i = 0; i < count; i++)
        {
            yield return entries[i];
        }
    }

    System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();

    private static int IndexOf(KeyValuePair<string, string>[] entries, int count, string key)
    {
        ArgumentNullException.ThrowIfNull(key);
        for (int i = 0; i < count; i++)
        {
            if (string.Equals(entries[i].Key, key, StringComparison.Ordinal))
            {
                return i;
            }
        }

        return -1;
    }
}

/// <summary>What a call carries in its metadata block, taken from its interceptor context when it is sent.</summary>
internal readonly struct OutgoingMetadata
{
    private OutgoingMetadata(IReadOnlyDictionary<string, string>? headers, DateTime? deadline, System.Diagnostics.Activity? trace)
    {
        Headers = headers;
        Deadline = deadline;
        Trace = trace;
    }

    public IReadOnlyDictionary<string, string>? Headers { get; }

    public DateTime? Deadline { get; }

    /// <summary>The span whose W3C trace context travels (the current one, when it has a W3C id), or null.</summary>
    public System.Diagnostics.Activity? Trace { get; }

    /// <summary>Nothing to carry: the request goes without a block.</summary>
    public bool IsEmpty => Headers is null && Deadline is null && Trace is null;

    /// <summary>The context's headers and deadline, and the current span (for its W3C trace context).</summary>
    public static OutgoingMetadata Of(ClientInterceptorContext context)
    {
        System.Diagnostics.Activity? current = System.Diagnostics.Activity.Current;
        return new OutgoingMetadata(context.HeadersOrNull, context.Deadline, current is { IdFormat: System.Diagnostics.ActivityIdFormat.W3C } ? current : null);
    }

    /// <summary>Writes the block (the deadline as the time left now).</summary>
    public void Encode(IBufferWriter<byte> destination)
    {
        TimeSpan? remaining = Deadline - DateTime.UtcNow;
        CallMetadata.Encode(destination, Headers, remaining > CallMetadata.MaxDeadline ? CallMetadata.MaxDeadline : remaining, Trace);
    }
}

/// <summary>
/// The caller's side of a deadline: a token that fires at it (linked to the caller's), and the
/// translation of what that firing causes into <see cref="DeadlineExceededException"/>. For unary and streamed calls alike.
/// </summary>
internal struct DeadlineTimer : IDisposable
{
    /// <summary>How much earlier than the caller's clock a server's timer may fire (timer granularity, a loaded machine).</summary>
    private static readonly TimeSpan Slack = TimeSpan.FromMilliseconds(100);

    private CancellationTokenSource? _source;
    private CancellationTokenRegistration _link;
    private CancellationToken _token;

    /// <summary>
    /// The token the call runs under: <paramref name="token"/> (the caller's), firing at the context's deadline too.
    /// </summary>
    /// <exception cref="DeadlineExceededException">The deadline has passed already (the request is discarded).</exception>
    public CancellationToken Arm(ClientInterceptorContext context, MessageBuilder request, CancellationToken token)
    {
        _token = token;
        if (context.Deadline is { } due)
        {
            TimeSpan left = due - DateTime.UtcNow;
            if (left <= TimeSpan.Zero)
            {
                request.Discard();
                throw new DeadlineExceededException($"The deadline of {context.FullName} had passed before it was sent.") { Deadline = due, Method = context.FullName };
            }

            if (left <= CallMetadata.MaxTimerDelay)
            {
                _source = DeadlineSources.Rent();
                _source.CancelAfter(left);
                if (token.CanBeCanceled)
                {
                    _link = token.UnsafeRegister(static source => ((CancellationTokenSource)source!).Cancel(), _source);
                }

                token = _source.Token;
            }
        }

        return token;
    }

    /// <summary>
    /// The deadline's exception when <paramref name="failure"/> is what the deadline caused: this side's timer
    /// cancelled the call, or the server's token fired at the deadline and its answer beat this side's timer.
    /// Null otherwise (the caller's own cancellation stays an <see cref="OperationCanceledException"/>).
    /// </summary>
    public readonly DeadlineExceededException? Exceeded(ClientInterceptorContext context, Exception failure)
    {
        if (context.Deadline is not { } due || _token.IsCancellationRequested)
        {
            return null;
        }

        bool exceeded = failure switch
        {
            OperationCanceledException => _source is { IsCancellationRequested: true },
            RemoteInvocationException remote => remote.RemoteExceptionType is "System.OperationCanceledException" or "System.Threading.Tasks.TaskCanceledException" && DateTime.UtcNow >= due - Slack,
            _ => false,
        };
        return exceeded
            ? new DeadlineExceededException($"{context.FullName} did not complete before its deadline ({due:O}).", failure) { Deadline = due, Method = context.FullName }
            : null;
    }

    /// <summary>
    /// Ends the timer: the caller's token no longer reaches it, and a source that never fired goes back to the pool.
    /// Once only: a second call (a stream disposed twice) must not return a source another call has rented since.
    /// </summary>
    public void Dispose()
    {
        if (_source is { } source)
        {
            _source = null;
            _link.Dispose(); // waits for a cancellation in progress: nothing cancels the source once it is back
            DeadlineSources.Return(source);
        }
    }
}

/// <summary>
/// Reused sources of deadline timers: a call with a deadline would otherwise allocate a source, its timer
/// and its registrations each time. Only a source that never fired goes back (<see cref="CancellationTokenSource.TryReset"/>
/// succeeds only then, and drops the registrations left on it).
/// </summary>
internal static class DeadlineSources
{
    private const int PerCore = 4;

    private static readonly CancellationTokenSource?[] s_sources = new CancellationTokenSource?[Math.Max(8, Environment.ProcessorCount * PerCore)];

    public static CancellationTokenSource Rent()
    {
        int start = Start();
        for (int n = 0; n < s_sources.Length; n++)
        {
            int i = (start + n) % s_sources.Length;
            CancellationTokenSource? source = Volatile.Read(ref s_sources[i]);
            if (source is not null && Interlocked.CompareExchange(ref s_sources[i], null, source) == source)
            {
                return source;
            }
        }

        return new CancellationTokenSource();
    }

    public static void Return(CancellationTokenSource source)
    {
        if (source.TryReset())
        {
            int start = Start();
            for (int n = 0; n < s_sources.Length; n++)
            {
                if (Interlocked.CompareExchange(ref s_sources[(start + n) % s_sources.Length], source, null) is null)
                {
                    return;
                }
            }
        }

        source.Dispose();
    }

    /// <summary>Each core starts at its own slots: threads on different cores do not all fight over the first ones, and a core mostly finds the source it gave back.</summary>
    private static int Start() => (int)((uint)Thread.GetCurrentProcessorId() * PerCore % (uint)s_sources.Length);
}

/// <summary>How a chain of interceptors is made: each one wraps the continuation of the next, the last wraps the call itself.</summary>
internal static class InterceptorChain
{
    /// <summary>The chain of <paramref name="interceptors"/> around <paramref name="last"/> (the first runs outermost).</summary>
    public static TContinuation Build<TInterceptor, TContinuation>(IReadOnlyList<TInterceptor> interceptors, TContinuation last, Func<TInterceptor, TContinuation, TContinuation> wrap)
    {
        TContinuation chain = last;
        for (int i = interceptors.Count - 1; i >= 0; i--)
        {
            chain = wrap(interceptors[i], chain);
        }

        return chain;
    }
}

/// <summary>
/// The interceptor chains of one pipeline, one per continuation type, each built on its first call and kept
/// (the innermost continuation reads the call from its context, so one chain serves every call with the same
/// result type). Each pipeline has its own: two servers or two clients with different interceptors in one
/// process keep theirs, however their calls alternate.
/// </summary>
internal sealed class InterceptorChainCache
{
    private static int s_slots;

    private readonly Lock _gate = new();
    private Delegate?[] _chains = new Delegate?[8];
    private int _built;

    /// <summary>How many chains this cache built (one per continuation type used).</summary>
    public int Built => Volatile.Read(ref _built);

    /// <summary>The chain of <paramref name="interceptors"/> around <paramref name="last"/>: the cached one, or built now and kept.</summary>
    public TContinuation Get<TInterceptor, TContinuation>(TInterceptor[] interceptors, TContinuation last, Func<TInterceptor, TContinuation, TContinuation> wrap)
        where TContinuation : Delegate
    {
        int slot = Slot<TContinuation>.Index;
        Delegate?[] chains = Volatile.Read(ref _chains);
        return (uint)slot < (uint)chains.Length && chains[slot] is TContinuation chain ? chain : Add(slot, interceptors, last, wrap);
    }

    private TContinuation Add<TInterceptor, TContinuation>(int slot, TInterceptor[] interceptors, TContinuation last, Func<TInterceptor, TContinuation, TContinuation> wrap)
        where TContinuation : Delegate
    {
        lock (_gate)
        {
            Delegate?[] chains = _chains;
            if (slot < chains.Length && chains[slot] is TContinuation existing)
            {
                return existing; // another thread built it meanwhile
            }

            TContinuation chain = InterceptorChain.Build(interceptors, last, wrap);
            if (slot >= chains.Length)
            {
                Array.Resize(ref chains, Math.Max(slot + 1, chains.Length * 2)); // a new array: readers of the old one see no chain and come here
            }

            Volatile.Write(ref chains[slot], chain);
            Volatile.Write(ref _chains, chains);
            _built++;
            return chain;
        }
    }

    /// <summary>A process-wide index per continuation type, into every cache's table.</summary>
    private static class Slot<TContinuation>
    {
        public static readonly int Index = Interlocked.Increment(ref s_slots) - 1;
    }
}
