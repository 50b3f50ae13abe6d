using Xunit;
using Verify = OffloadRpc.Analyzers.Tests.AnalyzerVerifier<OffloadRpc.Analyzers.ContractAnalyzer>;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>OFFRPC1001-1007: each reported where the contract breaks, and nothing on a valid or unmarked interface.</summary>
public sealed class ContractAnalyzerTests
{
    private const string Usings = """
        using System;
        using System.Collections.Generic;
        using System.Threading;
        using System.Threading.Tasks;
        using OffloadRpc;

        """;

    [Fact]
    public Task A_valid_contract_has_no_diagnostic() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default);
            Task SendAsync(ReadOnlyMemory<byte> data, SharedBuffer lease);
            Task<string[]> NamesAsync();
        }
        """);

    [Fact]
    public Task An_unmarked_interface_is_not_a_contract() => Verify.VerifyAsync(Usings + """
        public interface INotAService
        {
            int Add(int a, int b);
            Task<T> EchoAsync<T>(T value);
        }
        """);

    [Fact]
    public Task A_valid_streaming_contract_has_no_diagnostic() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            IAsyncEnumerable<int> CountAsync(int to, CancellationToken ct = default);
            IAsyncEnumerable<ReadOnlyMemory<byte>> FramesAsync();
            IAsyncEnumerable<SharedBuffer> RenderAsync(int width);
            Task<long> UploadAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> chunks);
            ValueTask<int> CountAsync(IAsyncEnumerable<string> names, CancellationToken ct = default);
            IAsyncEnumerable<ReadOnlyMemory<byte>> TransformAsync(IAsyncEnumerable<SharedBuffer> frames, int quality);
        }
        """);

    [Fact]
    public Task OFFRPC1007_a_stream_of_a_shape_that_cannot_cross() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            Task<IAsyncEnumerable<int>> {|OFFRPC1007:WrappedAsync|}();
            IAsyncEnumerable<IAsyncEnumerable<int>> {|OFFRPC1007:NestedAsync|}();
            Task TwoAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> a, IAsyncEnumerable<ReadOnlyMemory<byte>> {|OFFRPC1007:b|});
        }
        """);

    [Fact]
    public Task OFFRPC1001_a_method_that_does_not_return_a_task() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            int {|OFFRPC1001:Add|}(int a, int b);
            void {|OFFRPC1001:Fire|}();
        }
        """);

    [Fact]
    public Task OFFRPC1002_a_type_that_cannot_cross() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            Task AddAsync(ref int {|OFFRPC1002:a|});
            Task<int> SumAsync(Span<byte> {|OFFRPC1002:data|});
            Task RunAsync(Func<int, int> {|OFFRPC1002:callback|});
            Task SendAsync(ReadOnlyMemory<string> {|OFFRPC1002:names|});
            Task StoreAsync(Plain {|OFFRPC1002:value|});
            Task StoreMarkedAsync(Marked value);
        }

        public sealed class Plain { public int X { get; set; } }

        [MessagePack.MessagePackObject]
        public sealed class Marked { [MessagePack.Key(0)] public int X { get; set; } }
        """);

    [Fact]
    public Task OFFRPC1003_a_cancellation_token_that_is_not_last() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            Task WaitAsync(CancellationToken {|OFFRPC1003:ct|}, int milliseconds);
        }
        """);

    [Fact]
    public Task OFFRPC1004_a_generic_method() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            Task<int> {|OFFRPC1004:CountAsync|}<T>(int value);
        }
        """);

    [Fact]
    public Task OFFRPC1005_two_methods_with_one_method_id() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync(byte[] data);
            Task {|OFFRPC1005:SendAsync|}(ReadOnlyMemory<byte> data);
        }
        """);

    [Fact]
    public Task OFFRPC1006_an_interface_a_proxy_cannot_implement() => Verify.VerifyAsync(Usings + """
        [OffloadService]
        public interface {|OFFRPC1006:IGeneric|}<T>
        {
            Task<int> CountAsync(int value);
        }

        [OffloadService]
        public interface IWithMembers
        {
            Task PingAsync();
            int {|OFFRPC1006:Count|} { get; }
            event EventHandler {|OFFRPC1006:Changed|};
        }
        """);
}
