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
