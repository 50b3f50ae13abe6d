using System.Buffers;
using CsCheck;
using OffloadRpc.Internal;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The request metadata block (headers, deadline, trace context) and the scopes that fill it.</summary>
public sealed class CallMetadataTests
{
    [Fact]
    public void Headers_deadline_and_trace_context_survive_the_round_trip()
    {
        var headers = new Dictionary<string, string> { ["tenant"] = "acme", ["ünïcode"] = "välue ✓", ["empty"] = "" };
        var block = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(block, headers, TimeSpan.FromMilliseconds(1234.5), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=value");

        CallMetadata decoded = CallMetadata.Decode(block.WrittenMemory);
        Assert.Equal(headers.OrderBy(h => h.Key), decoded.Headers.OrderBy(h => h.Key));
        Assert.Equal(TimeSpan.FromMicroseconds(1_234_500), decoded.DeadlineRemaining);
        Assert.Equal("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", decoded.TraceParent);
        Assert.Equal("vendor=value", decoded.TraceState);
        Assert.True(System.Diagnostics.ActivityContext.TryParse(decoded.TraceParent, "vendor=value", isRemote: true, out System.Diagnostics.ActivityContext parsed));
        Assert.Equal(parsed, decoded.TraceContext); // read from the bytes as ActivityContext.TryParse reads the text
    }

    [Theory]
    [InlineData("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later")] // another version
    [InlineData("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01")] // uppercase
    [InlineData("00-00000000000000000000000000000000-b7ad6b7169203331-01")] // a zero trace id
    [InlineData("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01")] // a zero span id
    [InlineData("00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01")]
    [InlineData("garbage")]
    public void A_traceparent_not_of_version_00s_form_is_kept_as_text(string traceParent)
    {
        var block = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(block, null, null, traceParent, null);
        CallMetadata decoded = CallMetadata.Decode(block.WrittenMemory);
        Assert.Null(decoded.TraceContext);
        Assert.Equal(traceParent, decoded.TraceParent);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void A_spans_trace_context_is_written_as_its_W3C_id_and_trace_state(bool recorded)
    {
        using var span = new System.Diagnostics.Activity("call");
        span.SetIdFormat(System.Diagnostics.ActivityIdFormat.W3C);
        span.ActivityTraceFlags = recorded ? System.Diagnostics.ActivityTraceFlags.Recorded : System.Diagnostics.ActivityTraceFlags.None;
        span.TraceStateString = "vendor=value";
        span.Start();
        var block = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(block, new Dictionary<string, string> { ["tenant"] = "acme" }, null, span);

        CallMetadata decoded = CallMetadata.Decode(block.WrittenMemory);
        Assert.Equal(span.Id, decoded.TraceParent);
        Assert.EndsWith(recorded ? "-01" : "-00", decoded.TraceParent, StringComparison.Ordinal);
        Assert.Equal("vendor=value", decoded.TraceState);
        Assert.Equal("acme", decoded.Headers["tenant"]);
    }

    [Fact]
    public void A_deadline_timer_passes_the_callers_cancellation_on_which_is_not_a_deadline()
    {
        using var invoker = new LoopbackInvoker(new object());
        MessageBuilder request = MessageBuilder.Rent();
        var caller = new CancellationTokenSource();
        var context = new ClientInterceptorContext(invoker, new MethodDescriptor("Svc", "M", 1), request, null, DateTime.UtcNow.AddMinutes(5), caller.Token);
        DeadlineTimer timer = default;
        CancellationToken token = timer.Arm(context, request, caller.Token);
        Assert.False(token.IsCancellationRequested);

        caller.Cancel();
        Assert.True(token.IsCancellationRequested);
        Assert.Null(timer.Exceeded(context, new OperationCanceledException(token)));
        caller.Dispose(); // the caller's source may go first
        timer.Dispose();
        request.Discard();
        AssertPoolHandsOutOnlyFreshSources();
    }

    [Fact]
    public async Task A_deadline_that_fires_is_reported_and_its_source_is_never_handed_out_again()
    {
        using var invoker = new LoopbackInvoker(new object());
        MessageBuilder request = MessageBuilder.Rent();
        var context = new ClientInterceptorContext(invoker, new MethodDescriptor("Svc", "M", 1), request, null, DateTime.UtcNow.AddMilliseconds(20), CancellationToken.None);
        DeadlineTimer timer = default;
        CancellationToken token = timer.Arm(context, request, CancellationToken.None);
        var fired = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        using (token.Register(() => fired.TrySetResult()))
        {
            await fired.Task.WaitAsync(TimeSpan.FromSeconds(30));
        }

        DeadlineExceededException? exceeded = timer.Exceeded(context, new OperationCanceledException(token));
        Assert.NotNull(exceeded);
        Assert.Equal("/Svc/M", exceeded.Method);
        timer.Dispose();
        request.Discard();
        AssertPoolHandsOutOnlyFreshSources();
    }

    /// <summary>Every source the pool holds now is not cancelled (it holds at most a few dozen).</summary>
    private static void AssertPoolHandsOutOnlyFreshSources()
    {
        var rented = new List<CancellationTokenSource>();
        for (int i = 0; i < 256; i++)
        {
            CancellationTokenSource source = DeadlineSources.Rent();
            Assert.False(source.IsCancellationRequested);
            source.CancelAfter(Timeout.InfiniteTimeSpan); // throws for a source that was disposed
            rented.Add(source);
        }

        rented.ForEach(DeadlineSources.Return);
    }

    [Fact]
    public void Received_headers_read_as_a_dictionary_with_the_last_value_of_a_name_sent_twice()
    {
        Gen.Select(Gen.Int[0, 5], Gen.String[0, 3]).Array[0, 12].Sample(pairs =>
        {
            var block = new ArrayBufferWriter<byte>();
            var writer = new MessagePack.MessagePackWriter(block);
            writer.WriteArrayHeader(4);
            writer.WriteNil();
            writer.WriteNil();
            writer.WriteNil();
            writer.WriteMapHeader(pairs.Length);
            var expected = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach ((int name, string value) in pairs)
            {
                writer.Write("h" + name);
                writer.Write(value);
                expected["h" + name] = value;
            }

            writer.Flush();
            IReadOnlyDictionary<string, string> headers = CallMetadata.Decode(block.WrittenMemory).Headers;
            Assert.Equal(expected.Count, headers.Count);
            Assert.Equal(expected.OrderBy(h => h.Key, StringComparer.Ordinal), headers.OrderBy(h => h.Key, StringComparer.Ordinal));
            Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), headers.Keys.Order(StringComparer.Ordinal));
            for (int name = 0; name <= 5; name++)
            {
                Assert.Equal(expected.TryGetValue("h" + name, out string? want), headers.TryGetValue("h" + name, out string? got));
                Assert.Equal(want, got);
                Assert.Equal(expected.ContainsKey("h" + name), headers.ContainsKey("h" + name));
            }

            Assert.Throws<KeyNotFoundException>(() => headers["H0"]); // names are case-sensitive
        });
    }

    [Fact]
    public void An_empty_block_has_no_headers_deadline_or_trace()
    {
        var block = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(block, null, null, null, null);
        CallMetadata decoded = CallMetadata.Decode(block.WrittenMemory);
        Assert.Empty(decoded.Headers);
        Assert.Null(decoded.DeadlineRemaining);
        Assert.Null(decoded.TraceParent);
        Assert.Null(decoded.TraceState);
    }

    [Fact]
    public void A_passed_deadline_travels_as_zero_and_later_elements_are_skipped()
    {
        var block = new ArrayBufferWriter<byte>();
        var writer = new MessagePack.MessagePackWriter(block);
        writer.WriteArrayHeader(6); // a later version's block: two elements this one does not know
        writer.Write(-5L);
        writer.WriteNil();
        writer.WriteNil();
        writer.WriteNil();
        writer.Write("future");
        writer.WriteMapHeader(0);
        writer.Flush();
        CallMetadata decoded = CallMetadata.Decode(block.WrittenMemory);
        Assert.Equal(TimeSpan.Zero, decoded.DeadlineRemaining);
    }

    [Fact]
    public void More_headers_than_the_limit_are_a_protocol_violation()
    {
        var headers = Enumerable.Range(0, CallMetadata.MaxHeaders + 1).ToDictionary(i => "h" + i, i => "v");
        var block = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(block, headers, null, null, null);
        Assert.Throws<ProtocolViolationException>(() => CallMetadata.Decode(block.WrittenMemory));
    }

    [Fact]
    public void Any_bytes_either_decode_or_fail_with_ProtocolViolationException()
    {
        Gen.Byte.Array[0, 64].Sample(bytes =>
        {
            try
            {
                CallMetadata.Decode(bytes);
            }
            catch (ProtocolViolationException)
            {
            }
            catch (Exception ex)
            {
                throw new InvalidOperationException(Convert.ToHexString(bytes) + ": " + ex, ex);
            }
        }, iter: 5_000);
    }

    [Fact]
    public void Scopes_nest_inner_headers_override_and_an_inner_deadline_never_extends_the_outer_one()
    {
        Assert.Null(OffloadCallScope.Current);
        DateTime soon = DateTime.UtcNow.AddSeconds(1);
        using (OffloadCallScope outer = OffloadCallScope.Begin().WithHeader("a", "1").WithHeader("b", "2").WithDeadline(soon))
        {
            using (OffloadCallScope inner = OffloadCallScope.Begin().WithHeader("b", "3").WithDeadline(TimeSpan.FromHours(1)))
            {
                Assert.Same(inner, OffloadCallScope.Current);
                Assert.Equal(["a=1", "b=3"], inner.Headers.Select(h => $"{h.Key}={h.Value}").Order());
                Assert.Equal(soon, inner.Deadline);
            }

            Assert.Same(outer, OffloadCallScope.Current);
            Assert.Equal("2", outer.Headers["b"]);
        }

        Assert.Null(OffloadCallScope.Current);
        using (OffloadCallScope far = OffloadCallScope.Begin().WithDeadline(TimeSpan.MaxValue))
        {
            Assert.Equal(DateTime.MaxValue, far.Deadline); // no overflow; such a deadline arms no timer
        }
    }
}
